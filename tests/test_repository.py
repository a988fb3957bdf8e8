"""The shape of the repository that readers rely on (issue: read it beside the paper): the free-AT algorithm is
visible in each trainer, the top level never imports experiments/, and nothing points outside the repository."""
import ast
import inspect
import os

import cm_at
import dpm_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = ["attacks.py", "cm_at.py", "data.py", "dpm_at.py", "eval_fid.py", "sampler.py", "unet.py"]


def test_free_at_loop_is_in_each_trainer():
    """dpm_at.train_step and cm_at.train_step each hold the K-pass loop: one loss.backward() and one opt.step()
    per pass, and the ascent step on delta between them (Wang et al. 2025 Sec. 4; Shafahi et al. 2019 Alg. 1)."""
    for module in (dpm_at, cm_at):
        source = inspect.getsource(module.train_step)
        assert "for k in range(n_pass)" in source
        assert source.count("loss.backward()") == 1 and source.count("opt.step()") == 1
        assert source.index("loss.backward()") < source.index("delta = step(") < source.index("opt.step()")


def test_top_level_imports_no_experiments():
    """The components a reader copies import only each other and libraries, never experiments/."""
    for name in TOP_LEVEL:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert "experiments" not in imported, name
        assert not imported & {"benchmark", "toy_experiment", "robustness", "figures"}, name


def test_nothing_refers_outside_the_repository():
    """Code, docs and tests cite the papers, not a private notes folder beside the checkout."""
    banned = ("../" + "shared", "SPEC" + " §", "SPEC" + ".md", "FID_" + "NOTES")
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            if name.endswith((".py", ".md", ".txt", ".ini")):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                assert not [b for b in banned if b in text], os.path.join(folder, name)
