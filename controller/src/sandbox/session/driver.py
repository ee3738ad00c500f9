# DeltaBox python session driver (see docs/sessions.md). Runs as `python3 -u -c`.
# Request on fd 0: b"<length>\n" then <length> bytes of UTF-8 "<nonce>\n<code>".
# Reply: the code's own output, then "\036DBX<nonce> <status>\036" on stdout
# and on stderr. Input is read with os.read only (never sys.stdin, which
# buffers): no byte of the next request may sit in this process between calls,
# since a checkpoint restores it with fresh pipes. No threads, no extra fds.


def _dbx_main():
    import ast
    import builtins
    import linecache
    import os
    import signal
    import sys
    import types

    # The code's namespace is a fresh `__main__` module, so classes defined in
    # the session pickle, and the driver's own names stay out of its globals.
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    user_globals = main.__dict__
    counter = [0]

    def read_exact(n):
        chunks = []
        while n > 0:
            b = os.read(0, n)
            if not b:
                return None
            chunks.append(b)
            n -= len(b)
        return b"".join(chunks)

    def read_request():
        header = b""
        while not header.endswith(b"\n"):
            b = os.read(0, 1)
            if not b:
                return None
            header += b
        return read_exact(int(header))

    def write_all(fd, data):
        while data:
            data = data[os.write(fd, data):]

    def flush():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass

    def show_exception(exc):
        # Like the REPL: the traceback without the driver's own frame.
        tb = exc.__traceback__
        if tb is not None and tb.tb_frame.f_code is execute.__code__:
            tb = tb.tb_next
        exc = exc.with_traceback(tb)
        import traceback

        try:
            if sys.excepthook is sys.__excepthook__:
                # The C hook reads source lines from disk, not from linecache.
                traceback.print_exception(type(exc), exc, tb)
            else:
                sys.excepthook(type(exc), exc, tb)
        except Exception:
            traceback.print_exception(type(exc), exc, tb)

    def execute(code):
        counter[0] += 1
        filename = "<session-%d>" % counter[0]
        # Tracebacks show the source lines, as in the REPL.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            tree = ast.parse(code, filename, "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            body = compile(tree, filename, "exec")
            expr = compile(last, filename, "eval") if last is not None else None
        except (SyntaxError, ValueError, OverflowError) as exc:
            show_exception(exc.with_traceback(None))
            return 1
        try:
            exec(body, user_globals)
            if expr is not None:
                value = eval(expr, user_globals)
                if value is not None:
                    sys.displayhook(value)
            return 0
        except SystemExit as exc:
            # Ends this call, not the session.
            if exc.code is None:
                return 0
            if isinstance(exc.code, int):
                # The marker carries an i32.
                return exc.code if -(2**31) <= exc.code < 2**31 else 1
            print(exc.code, file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:
            show_exception(exc)
            return 130
        except BaseException as exc:
            show_exception(exc)
            return 1

    def guarded(code):
        # The code reads /dev/null, not the request pipe (nor do its children).
        saved = os.dup(0)
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            try:
                try:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    status = execute(code)
                finally:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
            except KeyboardInterrupt:
                # The interrupt landed in the driver around the code.
                status = 130
            flush()
        finally:
            os.dup2(saved, 0)
            os.close(saved)
        if sys.stdin is None or sys.stdin.closed:
            # `exit()` closes sys.stdin; give the code a usable one back.
            sys.stdin = open(0, closefd=False)
        return status

    # Descriptors inherited from whoever started us would be in every
    # checkpoint: only fds 0-2 may stay open.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    # Between calls a late SIGINT (a timeout racing the end of the code) is dropped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    write_all(1, b"\x1eDBX-ready\x1e")
    write_all(2, b"\x1eDBX-ready\x1e")
    while True:
        request = read_request()
        if request is None:
            os._exit(0)
        nonce, _, code = request.decode("utf-8", "surrogateescape").partition("\n")
        status = guarded(code)
        marker = ("\x1eDBX%s %d\x1e" % (nonce, status)).encode()
        write_all(2, marker)
        write_all(1, marker)


_dbx_main()
