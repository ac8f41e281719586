"""The house's layers: scripts (train.py, sample.py, tools/bench.py, and world/'s pretrain, evaluate and experiments) import
modules, never each other, and no two modules import each other; the method's files never import the world."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {'train', 'sample', 'tools.bench', 'world.pretrain', 'world.evaluate', 'world.experiments'}


METHOD = {'var', 'vqvae', 'frame_prompt', 'clip_loss', 'text_condition', 'mvp', 'update'}


def project_modules() -> dict:
    """{module name: its file}: the top-level files (train) and the packages' (world.shapes, tools.bench)."""
    modules = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith('.py')}
    for package in ('world', 'tools'):
        folder = os.path.join(ROOT, package)
        modules.update({f'{package}.{f[:-3]}': os.path.join(folder, f) for f in os.listdir(folder)
                        if f.endswith('.py') and f != '__init__.py'})
    return modules


def project_imports() -> dict:
    """{module name: the project's modules it imports, at any depth of the file (lazy imports included)}."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # from world import shapes: the module world.shapes; from world.shapes import X: world.shapes
                imported |= {node.module} | {f'{node.module}.{alias.name}' for alias in node.names}
        graph[name] = (imported & set(modules)) - {name}
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


def test_the_methods_files_never_import_the_world_or_a_tool():
    graph = project_imports()
    assert METHOD <= set(graph) and 'world.shapes' in graph
    allowed = METHOD | {'device', 'pretrained', 'baselines'}
    offenders = {f'{name} imports {sorted(graph[name] - allowed)}' for name in METHOD if graph[name] - allowed}
    assert not offenders, offenders
