"""colima-e2b code interpreter: the kernel of one bash context.

server.py starts one such process per bash context (protocol: kernel_channel.py). It
keeps one `bash --noprofile --norc -i` whose fd 1 and 2 are this process's own, i.e. the
pipes server.py reads, so all output streams without relaying. Variables, functions and
the working directory persist from cell to cell.

A cell is written to a private file and sourced, with stdin from /dev/null so user code
cannot read the command stream; the shell then reports `<run id> <status>` on a status
pipe. Bash is interactive only for its SIGINT behaviour: an interrupt aborts the current
command (a loop, a sleep) and the shell carries on, where a non-interactive shell would
exit. Job control, history, prompts and line editing are off.

A non-zero status of the cell (that of its last command) is reported as an error named
ExitCodeError; an interrupted cell as KeyboardInterrupt. If the shell exits (`exit` in a
cell), the run reports ShellExited and a new shell starts: the state is lost.
"""

import os
import re
import select
import shlex
import shutil
import subprocess
import tempfile

from kernel_channel import Channel

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def exports(env):
    """Shell lines exporting env (names a shell cannot take are skipped)."""
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items() if NAME.match(k))


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


class BashKernel:
    def __init__(self, chan):
        self.chan = chan
        self.dir = tempfile.mkdtemp(prefix="colima-e2b-bash-")
        self.cell = os.path.join(self.dir, "cell.sh")
        self.count = 0
        self.run_id = 0
        self.interrupted = False
        self.env = {}  # the persistent env server.py sent: a new shell gets it again
        self._start_shell()

    def _start_shell(self):
        status_r, status_w = os.pipe()
        stderr = os.dup(2)
        # Started with stderr on /dev/null so the warnings of an interactive shell without
        # a terminal are not shown; the first command then moves it to the real fd 2.
        self.bash = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "--noprofile", "--norc", "--noediting", "+m", "-i"],
            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(status_w, stderr))
        os.close(status_w)
        os.close(stderr)
        self.status_fd = status_w  # the same number in bash
        self.status = status_r
        self.status_buf = b""
        self.run_id += 1
        self._command(f"exec 2>&{stderr} {stderr}>&-; PS1= PS2= PS0= PROMPT_COMMAND=;"
                      f" unset HISTFILE; set +o history; {self._report('0')}\n")
        if self._wait_status() is None:
            raise SystemExit("bash did not start")

    def _report(self, status):
        return f"printf '%s %s\\n' {self.run_id} {status} >&{self.status_fd}"

    def _command(self, text):
        try:
            _write_all(self.bash.stdin.fileno(), text.encode())
            return True
        except OSError:
            return False  # the shell is gone; _wait_status notices

    def _wait_status(self):
        """The status the shell reports for the current run id, or None if it exited."""
        fallback_sent = False
        while True:
            lines = self.status_buf.split(b"\n")
            self.status_buf = lines.pop()
            for line in lines:
                run_id, _, status = line.decode().partition(" ")
                if run_id == str(self.run_id):  # older ids: reports of earlier interrupts
                    return int(status) if status.isdigit() else 1
            if self.interrupted and not fallback_sent:
                # The interrupt may have aborted the report line itself: queue another
                # (a late duplicate carries an old id and is ignored).
                fallback_sent = self._command(self._report("130") + "\n")
            ready, _, _ = select.select([self.status], [], [], 0.2)
            if ready:
                data = os.read(self.status, 4096)
                if not data:
                    return None
                self.status_buf += data
            elif self.bash.poll() is not None:
                return None

    def execute(self, msg):
        self.count += 1
        self.run_id += 1
        self.interrupted = False
        env = msg.get("env") or {}
        self.env.update(env)
        # Assignments before `.` hold for the sourced cell (and its children) only.
        run_env = "".join(f"{k}={shlex.quote(str(v))} "
                          for k, v in (msg.get("env_run") or {}).items() if NAME.match(k))
        with open(self.cell, "w") as f:
            f.write(msg.get("code", ""))
        self.chan.running = True
        self.chan.send({"type": "count", "n": self.count})
        self._command(f"{exports(env)}{run_env}. {shlex.quote(self.cell)} < /dev/null\n"
                      f"{self._report('$?')}\n")
        status = self._wait_status()
        self.chan.running = False
        if status is None:
            code = self.bash.wait()
            os.close(self.status)
            self.chan.send({"type": "error", "name": "ShellExited", "value": str(code),
                            "traceback": f"bash exited with status {code}; a new shell was"
                                         " started, the context's state is lost"})
            self._start_shell()
            self._command(exports(self.env))
        elif self.interrupted:
            self.chan.send({"type": "error", "name": "KeyboardInterrupt",
                            "value": "Execution interrupted", "traceback": ""})
        elif status != 0:
            self.chan.send({"type": "error", "name": "ExitCodeError", "value": str(status),
                            "traceback": f"The cell's last command exited with status {status}"})
        self.chan.send({"type": "done"})

    def close(self):
        self.bash.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    kernel = None

    def on_interrupt():
        # The shell and its foreground commands get the same SIGINT (one process
        # group); here it only decides how the run is reported.
        if kernel is not None:
            kernel.interrupted = True

    chan = Channel(on_interrupt=on_interrupt)
    kernel = BashKernel(chan)
    chan.ready()
    try:
        while (msg := chan.recv()) is not None:
            if msg.get("type") == "execute":
                kernel.execute(msg)
    finally:
        kernel.close()


if __name__ == "__main__":
    main()
