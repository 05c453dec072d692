"""Run a script's main() with a fault at the k-th call of one function: the tests' kill -9.

    python tests/fault_runner.py MODULE.FUNCTION K MODE SCRIPT.py [script arguments...]

MODE: 'kill' sends SIGKILL to this process when the function is called the K-th time (before it
runs: no clean-up, no flush, like a pre-empted job or the OOM killer); 'kill-after' does so
right after the K-th call returns.
"""
import importlib
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inject(target, k, mode):
    module_name, function_name = target.rsplit('.', 1)
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and mode == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == k and mode == 'kill-after':
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, function_name, wrapper)


def main():
    target, k, mode, script, *args = sys.argv[1:]
    sys.path.insert(0, ROOT)
    inject(target, int(k), mode)
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    from run import config
    config.run_cli(module.main, args)


if __name__ == '__main__':
    main()
