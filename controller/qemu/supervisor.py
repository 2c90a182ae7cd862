"""The per-VM supervisor: QEMU's parent, so that QEMU's wait status outlives the controller.

A QEMU the controller adopted after a restart is not its child: when it dies, nothing but its
parent can learn how. So the controller does not start QEMU itself; it starts this script, which
forks and execs QEMU, reports QEMU's pid, waits for it, writes the wait status to a file in the
runtime dir (temporary file + rename) and exits. It runs in its own session (the controller
starts it with start_new_session) with no terminal, so a controller restart does not touch it.

    python3 -I -S supervisor.py STATUS_FILE REPORT_FD EXECUTABLE ARGV0 ARGS...

- REPORT_FD gets "<qemu pid>\\n", or "error: <why>" when exec failed, then is closed.
- TERM, INT and HUP sent to the supervisor are passed on to QEMU (it keeps waiting, so the
  exit is still recorded); the controller itself signals QEMU directly, by pid.
- The runtime lock QEMU inherits is open here too, and is released only when this process
  exits, after the status file is written: no second QEMU of the VM starts before that.
- It never outlives QEMU: it only waits, and exits as soon as QEMU has.

Only built-in modules, no `os`, `signal` or `json`: started with -I -S, this interpreter costs
about 3 MiB of private memory per VM, and `os` plus `signal` (which imports enum) add another
MiB (measured figures: docs/controller.md, "The per-VM supervisor").
"""

# contextlib would cost memory too: hence try/except/pass below (SIM105).
import _signal  # the C half of `signal`, already loaded at start-up
import posix
import sys
import time

FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
# Python ignores these at start-up and exec keeps ignored signals ignored: QEMU gets the defaults.
RESET_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ)
EXEC_FAILED = 127


def main(args: list[str]) -> int:
    status_file, report_fd, executable, argv = args[0], int(args[1]), args[2], args[3:]
    errors_read, errors_write = posix.pipe()  # close-on-exec: EOF means exec succeeded
    pid = posix.fork()
    if pid == 0:
        _exec_child(executable, argv, report_fd, (errors_read, errors_write))
    posix.close(errors_write)
    for number in FORWARDED_SIGNALS:
        _signal.signal(number, lambda signum, _frame: _forward(pid, signum))
    error = _read_all(errors_read)
    if error:
        _write_all(report_fd, b"error: " + error)
        posix.waitpid(pid, 0)
        return EXEC_FAILED
    _write_all(report_fd, b"%d\n" % pid)
    posix.close(report_fd)
    _, status = posix.waitpid(pid, 0)  # retried after a forwarded signal (PEP 475)
    _write_status(status_file, pid, status)
    return 0


def _exec_child(executable: str, argv: list[str], report_fd: int, errors: tuple[int, int]) -> None:
    errors_read, errors_write = errors
    posix.close(errors_read)
    posix.close(report_fd)
    for number in RESET_SIGNALS:
        _signal.signal(number, _signal.SIG_DFL)
    try:
        posix.execv(executable, argv)
    except OSError as err:
        _write_all(errors_write, f"cannot execute {executable}: {err.strerror}".encode())
    posix._exit(EXEC_FAILED)


def _forward(pid: int, signum: int) -> None:
    try:  # noqa: SIM105
        posix.kill(pid, signum)
    except ProcessLookupError:
        pass  # already gone: waitpid returns at once


def _write_status(status_file: str, pid: int, status: int) -> None:
    """`{"pid", "exitCode", "signal", "at"}`, written whole: a reader sees it all or nothing."""
    exit_code = str(posix.WEXITSTATUS(status)) if posix.WIFEXITED(status) else "null"
    signal = str(posix.WTERMSIG(status)) if posix.WIFSIGNALED(status) else "null"
    text = f'{{"pid": {pid}, "exitCode": {exit_code}, "signal": {signal}, "at": {time.time():.6f}}}\n'
    directory = status_file.rpartition("/")[0]
    try:  # noqa: SIM105
        posix.mkdir(directory, 0o700)  # the runtime dir was removed under the live VM
    except FileExistsError:
        pass
    temporary = status_file + ".tmp"
    fd = posix.open(temporary, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, text.encode())
    finally:
        posix.close(fd)
    posix.rename(temporary, status_file)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := posix.read(fd, 4096):
        chunks.append(chunk)
    posix.close(fd)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[posix.write(fd, data) :]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
