"""The per-VM supervisor: QEMU's parent, so that QEMU's wait status outlives the controller.

A QEMU the controller adopted after a restart is not its child: when it dies, nothing but its
parent can learn how. So the controller does not start QEMU itself; it starts this script, which
forks and execs QEMU, reports QEMU's pid, waits for it, writes the wait status to a file in the
runtime dir (temporary file + rename) and exits. It runs in its own session (the controller
starts it with start_new_session) with no terminal, so a controller restart does not touch it.

    python3 -I -S supervisor.py STATUS_FILE RECORD_FILE RECORD_START REPORT_FD EXECUTABLE ARGV0 ARGS...

- Once QEMU's exec succeeded, it writes the launch record (RECORD_FILE): RECORD_START, the
  controller's part of the JSON object (argv, digest, start time) without its closing brace,
  completed with the pids and /proc start times of QEMU and of itself. So a controller killed
  at any moment of a spawn never leaves a QEMU that no launch record names.
- REPORT_FD then gets "<qemu pid>\\n", or "error: <why>" when exec failed, and is closed.
- TERM, INT and HUP sent to the supervisor are passed on to QEMU (it keeps waiting, so the
  exit is still recorded); the controller itself signals QEMU directly, by pid.
- The runtime lock QEMU inherits is open here too, and is released only when this process
  exits, after the status file is written: no second QEMU of the VM starts before that.
- It never outlives QEMU: it only waits, and exits as soon as QEMU has.

Only built-in modules, no `os`, `signal` or `json`: started with -I -S, this interpreter costs
about 3 MiB of private memory per VM, and `os` plus `signal` (which imports enum) would add
another 0.5 MiB (measured figures: docs/controller.md, "The per-VM supervisor").
"""

# contextlib would cost memory too: hence try/except/pass below (SIM105).
import _signal  # the C half of `signal`, already loaded at start-up
import posix
import sys
import time

FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
# exec keeps ignored signals ignored and the signal mask as it is: Python ignores SIGPIPE and
# SIGXFSZ, and whatever started the server may ignore more (nohup ignores SIGHUP). QEMU starts
# with every disposition at its default and nothing blocked, however the server was started.
RESET_SIGNALS = tuple(
    number for number in _signal.valid_signals() if number not in (_signal.SIGKILL, _signal.SIGSTOP)
)
EXEC_FAILED = 127


def main(args: list[str]) -> int:
    status_file, record_file, record_start = args[0], args[1], args[2]
    report_fd, executable, argv = int(args[3]), args[4], args[5:]
    errors_read, errors_write = posix.pipe()  # close-on-exec: EOF means exec succeeded
    pid = posix.fork()
    if pid == 0:
        _exec_child(executable, argv, report_fd, (errors_read, errors_write))
    posix.close(errors_write)
    for number in FORWARDED_SIGNALS:
        _signal.signal(number, lambda signum, _frame: _forward(pid, signum))
    error = _read_all(errors_read)
    if error:
        _report(report_fd, b"error: " + error)
        posix.waitpid(pid, 0)
        return EXEC_FAILED
    me = posix.getpid()
    try:
        _write_file(
            record_file,
            f'{record_start}"pid": {pid}, "startTicks": {_start_ticks(pid)}, '
            f'"supervisor": {{"pid": {me}, "startTicks": {_start_ticks(me)}}}}}',
        )
    except OSError as err:  # a QEMU no record names could never be stopped: it goes now
        posix.kill(pid, _signal.SIGKILL)
        posix.waitpid(pid, 0)
        _report(report_fd, f"error: cannot write the launch record: {err}".encode())
        return EXEC_FAILED
    _report(report_fd, b"%d\n" % pid)
    _, status = posix.waitpid(pid, 0)  # retried after a forwarded signal (PEP 475)
    _write_status(status_file, pid, status)
    return 0


def _exec_child(executable: str, argv: list[str], report_fd: int, errors: tuple[int, int]) -> None:
    errors_read, errors_write = errors
    posix.close(errors_read)
    posix.close(report_fd)
    for number in RESET_SIGNALS:
        try:  # noqa: SIM105 (contextlib would cost memory in every supervisor)
            _signal.signal(number, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # signals the C library reserves for its threads cannot be set
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
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
    _write_file(
        status_file, f'{{"pid": {pid}, "exitCode": {exit_code}, "signal": {signal}, "at": {time.time():.6f}}}'
    )


def _start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat, after the command name (which may hold spaces and ')')."""
    try:
        fd = posix.open(f"/proc/{pid}/stat", posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return -1
    try:
        return int(_read_all(fd).rpartition(b")")[2].split()[19])
    except (IndexError, ValueError):
        return -1


def _write_file(path: str, text: str) -> None:
    """Written to a temporary file and renamed: a reader sees all of it or nothing."""
    directory = path.rpartition("/")[0]
    try:  # noqa: SIM105
        posix.mkdir(directory, 0o700)  # the runtime dir was removed under the live VM
    except FileExistsError:
        pass
    temporary = path + ".tmp"
    fd = posix.open(temporary, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, text.encode() + b"\n")
    finally:
        posix.close(fd)
    posix.rename(temporary, path)


def _report(fd: int, message: bytes) -> None:
    """Tell the controller, if it is still there to read: one killed meanwhile changes nothing."""
    try:  # noqa: SIM105
        _write_all(fd, message)
    except OSError:
        pass
    posix.close(fd)


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
