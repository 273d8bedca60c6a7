"""colima-e2b code interpreter: the kernel of one Python context.

server.py starts one such process per Python context (see kernel_channel.py for the
protocol). Cells run in an IPython InteractiveShell, so magics, `!cmd`, top-level await
and IPython's display system work as in a notebook:

- the value of a cell's last expression is the run's main result, its MIME bundle coming
  from IPython's display formatter (a DataFrame gives text and html);
- display(obj) gives further results (not main);
- matplotlib draws with Agg (server.py sets MPLBACKEND); after each cell, and on
  plt.show(), every open figure is sent as a result with png and text and then closed;
- an exception gives one error (name, value, plain-text traceback).

Nothing heavy is imported before it is used: numpy, pandas and matplotlib load only when
user code imports them.
"""

import base64
import importlib.machinery
import io
import os
import sys

from kernel_channel import Channel

# User code imports from its working directory, as in a notebook, not from this one.
sys.path[0] = ""

# The E2B result fields of the MIME types the SDKs know; other types go to "extra".
FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
}


def result_fields(bundle):
    """A MIME bundle as the fields of an E2B result (binary data base64-encoded)."""
    out, extra = {}, {}
    for mime, value in bundle.items():
        if isinstance(value, (bytes, bytearray)):
            if mime.startswith("text/") or mime in ("application/javascript", "image/svg+xml"):
                value = bytes(value).decode("utf-8", "replace")
            else:
                value = base64.b64encode(value).decode("ascii")
        if mime in FIELDS:
            out[FIELDS[mime]] = value
        else:
            extra[mime] = value
    if extra:
        out["extra"] = extra
    return out


class PythonKernel:
    def __init__(self, chan):
        self.chan = chan
        self.errored = False  # one error per cell, the first
        self.shown = set()  # ids of figures already sent in this cell
        self.shell = self._make_shell()
        self._hook_pyplot()

    # -- IPython ---------------------------------------------------------------------

    def _make_shell(self):
        from IPython.core.displayhook import DisplayHook
        from IPython.core.displaypub import DisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets import Type
        from traitlets.config import Config

        kernel = self

        class Hook(DisplayHook):
            """The cell's value: the main result (instead of `Out[n]:` on stdout)."""

            def write_output_prompt(self):
                pass

            def write_format_data(self, format_dict, md_dict=None):
                kernel.publish(format_dict, main=True)

            def finish_displayhook(self):
                pass

        class Publisher(DisplayPublisher):
            """display() calls: further results."""

            def publish(self, data, metadata=None, source=None, *, transient=None,
                        update=False, **kwargs):
                kernel.publish(data, main=False)

            def clear_output(self, wait=False):
                pass

        class Shell(InteractiveShell):
            displayhook_class = Type(Hook)
            display_pub_class = Type(Publisher)

            def _showtraceback(self, etype, evalue, stb):
                kernel.error(etype.__name__, str(evalue), self.InteractiveTB.stb2text(stb))

            def ask_exit(self):  # exit() / quit()
                print("exit() does not end the context; restart the context to reset it",
                      file=sys.stderr)

        config = Config()
        config.HistoryManager.enabled = False  # no sqlite file shared by all kernels
        config.InteractiveShell.colors = "NoColor"  # tracebacks as plain text
        shell = Shell.instance(config=config)
        # `!cmd` inherits fd 1 and 2 (output streams as is) rather than running on a pty.
        shell.system = shell.system_raw
        # Figures shown as a cell's value or by display() get a PNG, as in a notebook.
        png = shell.display_formatter.formatters["image/png"]
        png.for_type_by_name("matplotlib.figure", "Figure", self._figure_png)
        return shell

    def _figure_png(self, fig):
        self.shown.add(id(fig))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()

    # -- matplotlib ------------------------------------------------------------------

    def _hook_pyplot(self):
        """Makes plt.show() send the figures, once user code imports pyplot.

        A meta-path finder patches the module right after it loads, so importing
        matplotlib stays the user's (lazy) choice.
        """
        kernel = self

        class Finder:
            def find_spec(self, name, path=None, target=None):
                if name != "matplotlib.pyplot":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                if spec is None or spec.loader is None:
                    return spec
                exec_module = spec.loader.exec_module

                def exec_and_patch(module):
                    exec_module(module)

                    def show(*args, **kwargs):
                        """Sends every open figure as a result (colima-e2b)."""
                        kernel.flush_figures()

                    module.show = show

                spec.loader.exec_module = exec_and_patch
                return spec

        sys.meta_path.insert(0, Finder())

    def flush_figures(self):
        """Sends the open figures not yet shown as results, then closes them all."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in plt.get_fignums():
            fig = plt.figure(num)
            if id(fig) not in self.shown:
                try:
                    self.publish({"text/plain": repr(fig), "image/png": self._figure_png(fig)},
                                 main=False)
                except Exception as e:  # a figure that cannot render must not fail the cell
                    print(f"could not render {fig!r}: {e}", file=sys.stderr)
            plt.close(fig)
        self.shown.clear()

    # -- messages --------------------------------------------------------------------

    def publish(self, bundle, main):
        self.chan.send({"type": "result", "result": result_fields(bundle), "main": main})

    def error(self, name, value, traceback):
        if not self.errored:
            self.errored = True
            self.chan.send({"type": "error", "name": name, "value": value,
                            "traceback": traceback})

    def execute(self, msg):
        os.environ.update(msg.get("env") or {})
        run_env = msg.get("env_run") or {}
        saved = {k: os.environ.get(k) for k in run_env}
        os.environ.update(run_env)
        self.errored = False
        try:
            # Interruptible from here: a SIGINT while "count" is being sent is deferred
            # to right after it and then lands in the except below.
            self.chan.running = True
            self.chan.send({"type": "count", "n": self.shell.execution_count})
            self.shell.run_cell(msg.get("code", ""), store_history=True)
        except KeyboardInterrupt:  # one outside the cell's code (IPython reports those in it)
            self.chan.running = False
            self.error("KeyboardInterrupt", "", "KeyboardInterrupt")
        finally:
            self.chan.running = False
        try:
            self.flush_figures()
        except Exception as e:
            print(f"could not send the figures: {e}", file=sys.stderr)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.chan.send({"type": "done"})


def main():
    chan = Channel()
    # Line-buffered whatever PYTHONUNBUFFERED says: a print is one write, prints stream
    # as they happen, and the channel flushes before each message so nothing is left
    # behind at the end of a cell.
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8",
        errors="backslashreplace", line_buffering=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
        errors="backslashreplace", line_buffering=True)
    sys.stdin = sys.__stdin__ = open(os.devnull)
    kernel = PythonKernel(chan)
    chan.ready()
    while (msg := chan.recv()) is not None:
        if msg.get("type") == "execute":
            try:
                kernel.execute(msg)
            except KeyboardInterrupt:  # a second SIGINT while leaving a cell
                chan.running = False
                chan.send({"type": "done"})


if __name__ == "__main__":
    main()
