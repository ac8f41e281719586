"""The house's layers: scripts (train.py, sample.py, evaluate.py, pretrain.py, pretrain3.py, experiments.py, bench.py)
import modules, never each other, and no two modules import each other."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {'train', 'sample', 'evaluate', 'pretrain', 'pretrain3', 'experiments', 'bench'}


def project_imports() -> dict:
    """{file stem: the project's files it imports, at any depth of the file (lazy imports included)}."""
    stems = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}
    graph = {}
    for stem in stems:
        with open(os.path.join(ROOT, stem + '.py')) as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split('.')[0])
        graph[stem] = (names & stems) - {stem}
    return graph


def test_no_file_imports_a_script():
    graph = project_imports()
    assert SCRIPTS <= set(graph)
    offenders = {f'{stem} imports {sorted(targets & SCRIPTS)}' for stem, targets in graph.items() if targets & SCRIPTS}
    assert not offenders, offenders


def test_no_two_modules_import_each_other():
    graph = project_imports()
    circles = {tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, set())}
    assert not circles, circles
