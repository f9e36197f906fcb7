"""The README and the docs/ pages are checked against the code, so that they cannot rot.

* Every ```python block runs, each in a fresh interpreter from the repository's root; the
  examples compare their results with plain Keras themselves, and a block that predicts
  must assert something. A block marked ```python fragment (a piece of a reader's code) is
  only compiled, and at most MAX_FRAGMENTS blocks of any language may be so marked.
* Every ```sh / ```bash / ```console command line names only what exists: make targets,
  modules ``python -m`` finds, files, the runner's own flags, setup.cfg's extras and
  console script; programs of other projects (EXTERNAL_TOOLS) only for the paths they
  name. A command this file has no check for fails the test.
* Every relative link (and its #anchor) points at a file (and heading) that exists, and
  every repository path named in backquotes exists.
* The README has at most 250 lines; docs/options.md names every option, runner flag and
  environment variable; docs/report.md's JSON schema names the keys a real
  ``--stats-json`` file holds; the README's results table is the one in
  docs/benchmarks.md; the README's runner example runs, and its outputs equal plain's.
"""
import collections
import glob
import importlib.machinery
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_same

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md'] + sorted(os.path.relpath(p, ROOT)
                               for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
README_MAX_LINES = 250
MAX_FRAGMENTS = 3
LANGUAGES = {'python', 'sh', 'bash', 'console', 'text'}
# Pages other branches are adding, linked before they exist; drop each name here once
# its page is merged.
PAGES_BEING_WRITTEN = set()
# Written by `make bench`, not kept in the repository.
GENERATED = ('benchmarks/results/',)
# Programs of other projects a page may show (servers, clusters, set-up): their lines are
# checked only for the repository paths they name. Anything else needs a check below.
EXTERNAL_TOOLS = {'spark-submit', 'spark-class', 'gunicorn', 'celery', 'redis-server',
                  'java', 'pyenv', 'curl', 'cd', 'export', 'kill'}
RUN_TIMEOUT = 150          # seconds for one block or command (a loaded 2-core machine)

Block = collections.namedtuple('Block', 'page line language fragment text')


def read(page):
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        return f.read()


def blocks_of(page):
    """The fenced code blocks of a page (dedented to their fence)."""
    found, lines = [], read(page).split('\n')
    i = 0
    while i < len(lines):
        m = re.match(r'^(\s*)```(.*)$', lines[i])
        if m:
            indent, info = len(m.group(1)), m.group(2).split()
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != '```':
                body.append(lines[i][indent:])
                i += 1
            assert i < len(lines), '%s:%d: a code fence is not closed' % (page, start)
            found.append(Block(page, start, info[0] if info else '',
                               'fragment' in info[1:], '\n'.join(body) + '\n'))
        i += 1
    return found


def prose_of(page):
    """The page without its code blocks (headings and links live there)."""
    return re.sub(r'^\s*```.*?^\s*```\s*$', '', read(page), flags=re.S | re.M)


ALL_BLOCKS = [b for page in PAGES for b in blocks_of(page)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.language == 'python' and not b.fragment]
SHELL_BLOCKS = [b for b in ALL_BLOCKS
                if b.language in ('sh', 'bash', 'console') and not b.fragment]


def block_id(block):
    return '%s:%d' % (block.page, block.line)


def environ():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
               PYTHONWARNINGS='ignore::FutureWarning,ignore::DeprecationWarning')
    env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in env.get('PYTHONPATH', '').split(
        os.pathsep) if p])
    return env


def run(argv, **env):
    proc = subprocess.run(argv, cwd=ROOT, env=dict(environ(), **env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, '%s failed (%d):\n%s\n%s' % (
        ' '.join(argv), proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


# --- the pages' shape ------------------------------------------------------------------

def test_the_readme_is_short():
    lines = read('README.md').count('\n')
    assert lines <= README_MAX_LINES, 'README.md has %d lines' % lines


def test_every_block_says_its_language_and_few_are_fragments():
    for block in ALL_BLOCKS:
        assert block.language in LANGUAGES, '%s: fence language %r (one of %s)' % (
            block_id(block), block.language, sorted(LANGUAGES))
    fragments = [block_id(b) for b in ALL_BLOCKS if b.fragment]
    assert len(fragments) <= MAX_FRAGMENTS, 'too many unchecked fragments: %s' % fragments
    assert PYTHON_BLOCKS and SHELL_BLOCKS          # the parser found the blocks


def test_python_fragments_still_compile():
    for block in ALL_BLOCKS:
        if block.language == 'python' and block.fragment:
            compile(block.text, block_id(block), 'exec')


# --- python blocks run ---------------------------------------------------------------------

@pytest.mark.timeout(RUN_TIMEOUT + 30)
@pytest.mark.parametrize('block', PYTHON_BLOCKS, ids=block_id)
def test_python_block_runs(block, tmp_path):
    if '.predict(' in block.text:
        # An example that shows predictions shows they equal plain Keras'.
        assert 'assert ' in block.text, '%s predicts but checks nothing' % block_id(block)
    script = tmp_path / ('%s_%d.py' % (re.sub(r'\W', '_', block.page), block.line))
    script.write_text(block.text)
    run([sys.executable, str(script)])


# --- shell commands name what exists -------------------------------------------------------

def commands(block):
    """Each command of a block: its words, without prompts, comments or env assignments."""
    text = re.sub(r'\\\n', ' ', block.text)
    for line in text.split('\n'):
        if block.language == 'console':
            if not line.startswith('$ '):
                continue                   # the command's output
            line = line[2:]
        words = shlex.split(line, comments=True)
        command = []
        for word in words + [';']:
            if word in ('&&', '||', ';', '|'):
                while command and re.match(r'^[A-Z_][A-Z0-9_]*=', command[0]):
                    del command[0]
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def make_targets():
    return set(re.findall(r'^([A-Za-z0-9_.-]+):', read('Makefile'), flags=re.M))


def setup_cfg_section(name):
    m = re.search(r'^\[%s\]\n(.*?)(?=^\[|\Z)' % re.escape(name), read('setup.cfg'),
                  flags=re.S | re.M)
    return m.group(1) if m else ''


def module_found(name, for_dash_m=True):
    """Whether python finds module ``name`` (from the root), without importing it."""
    spec, locations = None, [ROOT] + sys.path
    for part in name.split('.'):
        if locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(part, list(locations))
        if spec is None:
            return False
        locations = spec.submodule_search_locations
    if for_dash_m and locations is not None:       # a package runs its __main__
        return importlib.machinery.PathFinder.find_spec('__main__', list(locations)) is not None
    return True


def check_exists(path, where):
    full = os.path.join(ROOT, path)
    assert os.path.exists(full), '%s: %s does not exist' % (where, path)


def check_runner_args(args, where):
    from keras_fastpredict import runner
    own, module, script, rest = runner.split_argv(args)
    try:
        runner._parser().parse_args(own)            # the runner's own flags, as it reads them
    except SystemExit:
        pytest.fail('%s: the runner does not take %s' % (where, own))
    assert module or script, '%s: the runner needs a script or -m module' % where
    if module:
        check_python_module(module, rest, where)
    else:
        check_exists(script, where)


def check_python_module(module, args, where):
    assert module_found(module), '%s: python -m %s finds no such module' % (where, module)
    if module == 'keras_fastpredict':
        check_runner_args(args, where)
    elif module == 'pip':
        check_pip(args, where)


def check_pip(args, where):
    assert args[:1] == ['install'], '%s: pip %s' % (where, args)
    for arg in args[1:]:
        m = re.match(r'^\.\[(.*)\]$', arg)
        if m:
            extras = setup_cfg_section('options.extras_require')
            for extra in m.group(1).split(','):
                assert re.search(r'^%s =' % re.escape(extra), extras, flags=re.M), (
                    '%s: no extra %r in setup.cfg' % (where, extra))


def check_python(args, where):
    i = 0
    while i < len(args) and args[i].startswith('-'):
        if args[i] == '-m':
            return check_python_module(args[i + 1], args[i + 2:], where)
        if args[i] == '-c':
            return compile(args[i + 1], where, 'exec')
        i += 2 if args[i] in ('-X', '-W') else 1
    assert i < len(args), '%s: python runs nothing' % where
    check_exists(args[i], where)


def check_command(words, where):
    head, args = words[0], words[1:]
    if head == 'make':
        targets = make_targets()
        for arg in args:
            if '=' not in arg and not arg.startswith('-'):
                assert arg in targets, '%s: no make target %r' % (where, arg)
    elif re.match(r'^(\.venv/bin/)?python(3(\.7)?)?$', head):
        check_python(args, where)
    elif head == 'keras-fastpredict':
        assert 'keras-fastpredict = keras_fastpredict.runner:main' in setup_cfg_section(
            'options.entry_points'), '%s: no keras-fastpredict console script' % where
        check_runner_args(args, where)
    elif head in ('bash', 'sh'):
        check_exists(args[0], where)
    elif head == 'pip':
        check_pip(args, where)
    elif head in EXTERNAL_TOOLS:
        pass
    else:
        pytest.fail('%s: no check for the command %r here: add one, or mark the block '
                    'fragment' % (where, head))
    for word in words:                              # any repository path it names
        path = word.split('=')[-1]                  # --option=path too
        first = path.split('/')[0]
        if '/' in path and first and os.path.isdir(os.path.join(ROOT, first)) \
                and not path.startswith(GENERATED):
            check_exists(path, where)


@pytest.mark.parametrize('block', SHELL_BLOCKS, ids=block_id)
def test_shell_commands_name_what_exists(block):
    found = list(commands(block))
    assert found, '%s: no command in the block' % block_id(block)
    for words in found:
        check_command(words, '%s: %s' % (block_id(block), ' '.join(words)))


# --- links and paths -------------------------------------------------------------------------

def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def anchors(page):
    return {slug(h) for h in re.findall(r'^#+\s+(.*)$', prose_of(page), flags=re.M)}


@pytest.mark.parametrize('page', PAGES)
def test_links_point_at_files_and_headings(page):
    folder = os.path.dirname(page)
    links = re.findall(r'\]\(([^)\s]+)\)', prose_of(page))
    assert links or page == 'README.md'
    for link in links:
        if re.match(r'^[a-z]+:', link):             # http(s), mailto: not ours to check
            continue
        path, _, anchor = link.partition('#')
        target = os.path.normpath(os.path.join(folder, path)) if path else page
        if target in PAGES_BEING_WRITTEN and not os.path.exists(os.path.join(ROOT, target)):
            continue
        assert os.path.exists(os.path.join(ROOT, target)), '%s: link to %s: no such file' % (
            page, link)
        if anchor:
            assert target.endswith('.md'), '%s: anchor into %s' % (page, link)
            assert anchor in anchors(target), '%s: link to %s: no such heading in %s' % (
                page, link, target)


@pytest.mark.parametrize('page', PAGES)
def test_paths_named_in_backquotes_exist(page):
    for code in re.findall(r'`([^`\s]+)`', prose_of(page)):
        first = code.split('/')[0]
        if ('/' in code and not re.search(r'[<>*(){}\[\]]', code) and first
                and os.path.isdir(os.path.join(ROOT, first))
                and re.search(r'\.(py|sh|md|png|c|cfg|txt|patch)$', code)
                and not code.startswith(GENERATED) and code not in PAGES_BEING_WRITTEN):
            check_exists(code, page)


# --- what the pages must list ----------------------------------------------------------------

def test_options_page_names_every_option_flag_and_variable():
    from keras_fastpredict import config, runner
    page = read('docs/options.md')
    for name in config.DEFAULTS:
        assert '`%s`' % name in page, 'docs/options.md: option %s' % name
    for action in runner._parser()._actions:
        for flag in action.option_strings:
            if flag not in ('-h', '--help'):
                assert '`%s' % flag in page, 'docs/options.md: runner flag %s' % flag
    source = ''.join(open(p, encoding='utf-8').read() for p in glob.glob(
        os.path.join(ROOT, 'keras_fastpredict', '**', '*.py'), recursive=True))
    variables = set(re.findall(r'KERAS_FASTPREDICT_[A-Z][A-Z_]*[A-Z]', source))
    assert 'KERAS_FASTPREDICT_BOOTSTRAP' in variables      # the scan found the package's
    for variable in variables:
        assert variable in page, 'docs/options.md: %s' % variable


def test_readme_results_table_is_the_benchmarks_pages():
    readme = read('README.md')
    results = readme[readme.index('\n## Results'):]
    rows = [line for line in results.split('\n') if line.startswith('| ')]
    assert len(rows) > 20
    benchmarks = read('docs/benchmarks.md').split('\n')
    for row in rows:
        assert row in benchmarks, 'not in docs/benchmarks.md: %s' % row
    assert '](docs/per_call.png)' in results


def test_same_result_page_states_the_tests_measure():
    # Its numpy function is what the tests call the promise (on finite values).
    from keras_fastpredict.engine.verification import within_tolerance
    code = [b for b in blocks_of('docs/same-result.md') if 'def within_tolerance' in b.text]
    assert len(code) == 1
    scope = {}
    exec(compile(code[0].text, block_id(code[0]), 'exec'), scope)
    stated = scope['within_tolerance']
    rng = np.random.RandomState(0)
    verdicts = collections.Counter()
    for _ in range(400):
        plain = (rng.randn(3, 4) * 10.0 ** rng.randint(-3, 4)).astype('float32')
        noise = rng.randn(3, 4) * 10.0 ** rng.randint(-9, -2)
        patched = (plain + noise).astype('float32')
        verdict = stated(patched, plain)
        assert verdict == within_tolerance(patched, plain), (plain, patched)
        verdicts[verdict] += 1
    assert verdicts[True] > 20 and verdicts[False] > 20     # both sides were tried


# --- documented commands, run ---------------------------------------------------------------

def documented_command(page, prefix):
    for block in blocks_of(page):
        if block.language in ('sh', 'bash', 'console') and not block.fragment:
            for words in commands(block):
                if ' '.join(words).startswith(prefix):
                    return words
    pytest.fail('%s shows no command starting %r' % (page, prefix))


@pytest.mark.timeout(2 * RUN_TIMEOUT + 30)
def test_readme_runner_example_runs_and_equals_plain(tmp_path):
    words = documented_command('README.md', 'python -m keras_fastpredict --stats benchmarks/')
    from keras_fastpredict import runner
    own, module, script, args = runner.split_argv(words[3:])
    plain_out, fast_out = str(tmp_path / 'plain.npz'), str(tmp_path / 'fast.npz')
    run([sys.executable, script] + args, KFP_BENCH_OUT=plain_out)     # the same script, plain
    proc = run([sys.executable] + words[1:], KFP_BENCH_OUT=fast_out)
    assert 'keras_fastpredict: model' in proc.stderr and ' in loop ' in proc.stderr
    plain, fast = np.load(plain_out), np.load(fast_out)
    outputs = [k for k in plain.files if k.startswith('out')]
    assert outputs and sorted(outputs) == sorted(k for k in fast.files if k.startswith('out'))
    for key in outputs:
        assert_same(fast[key], plain[key])


def json_keys(value, keys):
    if isinstance(value, dict):
        for key, item in value.items():
            keys.add(key)
            if key not in ('keras_reasons', 'one_time_ms'):   # keys: reasons, work done
                json_keys(item, keys)
    elif isinstance(value, list):
        for item in value:
            json_keys(item, keys)
    return keys


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_report_schema_names_the_keys_a_real_report_holds(tmp_path):
    schema = [b.text for b in blocks_of('docs/report.md') if '"version": 1' in b.text]
    assert len(schema) == 1
    documented = set(re.findall(r'"(\w+)":', schema[0]))
    kinds = set(re.findall(r'"kind": "(\w+)"', schema[0]))
    words = documented_command('docs/report.md', 'python -m keras_fastpredict --stats-json ')
    out = str(tmp_path / 'out.json')
    run([sys.executable] + [out if w == 'out.json' else w for w in words[1:]])
    with open(out) as f:
        data = json.load(f)
    site = data['sites'][0]
    assert site['advice'], 'the documented script no longer gets advice'
    written = json_keys(data, set())
    assert written <= documented, 'undocumented keys: %s' % sorted(written - documented)
    # Every key outside the advice items (whose keys depend on their kind) is written.
    before_advice = schema[0][:schema[0].index('"advice":')]
    required = set(re.findall(r'"(\w+)":', before_advice)) | {'advice'}
    assert required - written == set(), 'documented, not written: %s' % sorted(
        required - written)
    assert {a['kind'] for a in site['advice']} <= kinds
