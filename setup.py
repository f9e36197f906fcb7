# Kept so that `pip install -e .` works with the pip that Python 3.7 venvs ship.
from setuptools import setup

setup()
