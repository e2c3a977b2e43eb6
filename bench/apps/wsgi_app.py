"""The WSGI app for the gunicorn peer: GET / -> "pid=<pid> slot=-\n"."""
import os


def app(environ, start_response):
    body = f"pid={os.getpid()} slot=-\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
