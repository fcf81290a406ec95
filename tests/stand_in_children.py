"""Stand-ins for the children of ``siam serve --workers N`` in the supervisor's tests: they import nothing
heavy, so a spawned one starts in a fraction of a second, and they die however a test kills them."""

from __future__ import annotations

from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event


def hold(control: Connection | None = None, first_message: tuple[str, str] | None = None,
         stubborn: Event | None = None, seconds: float = 120.0) -> None:
    """Live until killed, ``seconds`` pass, or (as a model process) the supervisor says stop on ``control``;
    a model process that could not load first says so. A ``stubborn`` one ignores SIGTERM and "stop", and
    sets the event once it does."""
    import signal
    import time

    if stubborn is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stubborn.set()
        time.sleep(seconds)
        return
    if control is None:
        time.sleep(seconds)
        return
    if first_message is not None:
        control.send(first_message)
    control.poll(seconds)
