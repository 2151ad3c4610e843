"""vLLM's OpenAI-compatible server, exiting non-zero when its engine died: what `sora-serve serve` runs.

    python -m sora_serve.vllm_plugin.launch VLLM_SERVER_ARGUMENTS...

Stock vLLM, when the engine core dies (killed, out of memory, a crash), fails the in-flight
requests (HTTP 500 "EngineCore encountered an issue"), stops the HTTP server within seconds and
exits with status 0: to systemd's `Restart=on-failure` or a Kubernetes `restartPolicy: OnFailure`
that is a clean stop, and the server stays down. The decision is vLLM's `terminate_if_errored`
(called by the server's watchdog every 5 s and by the handler of a request that met the dead
engine); it is wrapped here to remember that the engine died, and once vLLM's server has shut down
the process exits with ENGINE_DIED_EXIT. A stop by signal (Ctrl-C, SIGTERM) still exits 0.
"""

from __future__ import annotations

import functools
import sys

ENGINE_DIED_EXIT = 3

_engine_died = False


def _remembering_death(stock):
    @functools.wraps(stock)
    def terminate_if_errored(server, engine):
        global _engine_died
        if engine.errored and not engine.is_running:
            _engine_died = True
        return stock(server, engine)

    return terminate_if_errored


def patch_engine_death() -> None:
    """Wrap `terminate_if_errored` where vLLM looks it up: its module and the error handler's, which binds it
    by name."""
    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error

    wrapped = _remembering_death(launcher.terminate_if_errored)
    launcher.terminate_if_errored = vllm_error.terminate_if_errored = wrapped


def main() -> None:
    patch_engine_death()
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    serve()  # parses sys.argv as vLLM's own server does
    if _engine_died:
        print(
            "sora-serve serve: vLLM's engine core died (see the log above); exiting with status "
            f"{ENGINE_DIED_EXIT} so that a supervisor restarts the server",
            file=sys.stderr,
        )
        sys.exit(ENGINE_DIED_EXIT)


if __name__ == "__main__":
    main()
