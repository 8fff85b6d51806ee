"""Lets lm-eval's own command line find duo's model: `lm_eval --model dlm ...` (harness.py).

lm-eval 0.4 looks models up in a registry filled by its own modules; it discovers no plugins. Python
imports this module at start-up through the file duo_lm_eval.pth that `./install.sh --lm-eval` puts
into the environment's site-packages. It only installs an import hook: when (and only when) a process
imports lm-eval's model registry, `dlm` is registered in it as the lazy reference `duo_lm_eval:DLM`,
which imports harness.py from this project the first time lm-eval asks for the model. Other programs
import nothing more than this file.
"""
import importlib.abc
import importlib.machinery
import os
import sys
import sysconfig

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTRY = 'lm_eval.api.registry'


def __getattr__(name):
    """duo_lm_eval.DLM: harness.DLM, imported from the project directory."""
    if name != 'DLM':
        raise AttributeError(f"module 'duo_lm_eval' has no attribute {name!r}")
    if PROJECT not in sys.path:
        sys.path.insert(0, PROJECT)
    import harness
    return harness.DLM


class _RegisterDLM(importlib.abc.MetaPathFinder):
    """Finds lm-eval's registry module as Python would, and registers `dlm` right after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            if 'dlm' not in module.model_registry:
                module.model_registry.register('dlm', target='duo_lm_eval:DLM')
        spec.loader.exec_module = exec_module
        return spec


def install(site_packages: str) -> str:
    """Write duo_lm_eval.pth into `site_packages`: this directory on the path, this module imported."""
    path = os.path.join(site_packages, 'duo_lm_eval.pth')
    with open(path, 'w') as f:
        f.write(f'{os.path.dirname(os.path.abspath(__file__))}\nimport duo_lm_eval\n')
    return path


if __name__ == '__main__':  # ./install.sh --lm-eval
    print(f'lm_eval --model dlm enabled: wrote {install(sysconfig.get_paths()["purelib"])}')
elif REGISTRY not in sys.modules and not any(isinstance(f, _RegisterDLM) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterDLM())
