"""The package's layout, read from its source (issue 24): no import circle (lazy imports
inside functions included), no private name used across modules, no module of more than
about 700 lines."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'keras_fastpredict')
MAX_LINES = 700


def _modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
                if module.endswith('.__init__'):
                    module = module[:-len('.__init__')]
                found[module] = path
    return found


MODULES = _modules()


def _imports(module):
    """(node, the package module it imports or the module a name comes from, name) for
    every import in ``module``, at any depth."""
    path = MODULES[module]
    base = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, None, alias.asname or alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split('.')[:len(base.split('.')) - node.level + 1]
                source = '.'.join(parts + ([node.module] if node.module else []))
            else:
                source = node.module or ''
            for alias in node.names:
                full = source + '.' + alias.name
                if full in MODULES:
                    yield node, full, None, alias.asname or alias.name
                else:
                    yield node, source, alias.name, alias.asname or alias.name


def _graph():
    return {m: {target for _, target, _, _ in _imports(m) if target in MODULES and target != m}
            for m in MODULES}


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_import_circle():
    assert len(MODULES) > 30
    assert _cycles(_graph()) == []


def _private(name):
    return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_private_name_crosses_modules(module):
    bound_modules = set()
    crossing = []
    for node, target, name, bound in _imports(module):
        if name is None and target in MODULES:
            bound_modules.add(bound)
        elif name is not None and target in MODULES and _private(name):
            crossing.append('from %s import %s' % (target, name))
    tree = ast.parse(open(MODULES[module]).read())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound_modules and _private(node.attr)):
            crossing.append('%s.%s (line %d)' % (node.value.id, node.attr, node.lineno))
    assert crossing == []


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_room_over_about_700_lines(module):
    with open(MODULES[module]) as f:
        assert sum(1 for _ in f) <= MAX_LINES
