"""The tests' layout: shared helpers live in tests/helpers (imported as `helpers.<module>`), test files
never import from each other or from conftest.py, and conftest.py defines fixtures and pytest hooks only."""

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent
TEST_FILES = sorted(TESTS.glob("test_*.py"))


def _imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def _is_fixture(decorator: ast.expr) -> bool:
    if isinstance(decorator, ast.Call):
        decorator = decorator.func
    return (isinstance(decorator, ast.Attribute) and decorator.attr == "fixture"
            and isinstance(decorator.value, ast.Name) and decorator.value.id == "pytest")


def test_test_files_import_no_test_file_nor_conftest():
    assert TEST_FILES
    bad = []
    for path in TEST_FILES + sorted((TESTS / "helpers").glob("*.py")):
        for lineno, module in _imported_modules(ast.parse(path.read_text(), str(path))):
            top = module.split(".")[0]
            if top == "conftest" or top.startswith("test_") or (TESTS / f"{top}.py").exists():
                bad.append(f"{path.relative_to(TESTS)}:{lineno} imports {module}")
    assert not bad, "import shared helpers from tests/helpers instead:\n" + "\n".join(bad)


def test_helpers_are_modules_of_the_helpers_package():
    loose = [p.name for p in TESTS.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py"]
    assert not loose, f"move these into tests/helpers: {loose}"
    assert (TESTS / "helpers" / "__init__.py").exists()


def test_conftest_defines_fixtures_and_hooks_only():
    for path in TESTS.rglob("conftest.py"):
        if "fixtures" in path.relative_to(TESTS).parts:
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.name.startswith("pytest_") or any(_is_fixture(d) for d in node.decorator_list), (
                    f"{path.relative_to(TESTS)}:{node.lineno}: {node.name} is neither a fixture nor a pytest "
                    "hook; move it to tests/helpers")
                continue
            if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id == "pytest_plugins"
                                                    for t in node.targets):
                continue
            raise AssertionError(f"{path.relative_to(TESTS)}:{node.lineno}: only fixtures and pytest hooks "
                                 "belong in conftest.py; move the rest to tests/helpers")
