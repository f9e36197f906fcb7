# Kept so that `pip install -e .` works with the pip that Python 3.7 venvs ship. The C
# extensions: the call-site report's usual call (where it cannot be built, the report runs
# the same logic in Python); deferred results' allocator and a deferred call's usual path
# (engine/_native/, one extension of several files; where it cannot be built, they are
# allocated as any object, and the deferral runs in Python).
from setuptools import Extension, setup

NATIVE = ['keras_fastpredict/engine/_native/%s.c' % name for name in (
    'module', 'uncounted', 'slots', 'deferrer', 'serves', 'auto_call', 'materializer',
    'settle')]

setup(ext_modules=[Extension('keras_fastpredict.report._steady',
                             ['keras_fastpredict/report/_steady.c'],
                             extra_compile_args=['-O2', '-std=c11'], optional=True),
                   Extension('keras_fastpredict.engine._deferral', NATIVE,
                             depends=['keras_fastpredict/engine/_native/deferral.h'],
                             extra_compile_args=['-O2', '-std=c11'], optional=True)])
