"""clt.site.viewer: the docs site over HTTP on localhost."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner

from clt.site import viewer
from clt.site.server import serve


def test_serves_the_site_and_its_data(site_dir):
    with serve(site_dir) as url:
        page = urllib.request.urlopen(url).read().decode()
        data = urllib.request.urlopen(url + "data/site.js").read().decode()
        assert '<script src="data/site.js">' in page and data.startswith("window.SITE_DATA = ")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "../../etc/passwd")  # the handler drops "..": nothing outside is served


def test_cli_prints_the_address_and_serves_until_stopped(site_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "clt.site.viewer", "--port", str(port), "--docs_dir", str(site_dir)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line
        deadline = time.time() + 10
        while True:
            try:
                assert b"app.js" in urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html").read()
                break
            except urllib.error.URLError:
                assert time.time() < deadline
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_clear_errors_for_a_missing_site_and_a_busy_port(site_dir, tmp_path):
    result = CliRunner().invoke(viewer.main, ["--docs_dir", str(tmp_path)])
    assert result.exit_code == 1 and "has no index.html" in result.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = CliRunner().invoke(viewer.main, ["--docs_dir", str(site_dir), "--port", str(s.getsockname()[1])])
    assert result.exit_code == 1 and "try another --port" in result.output


def test_nul_bytes_and_folders_get_plain_http_errors(site_dir):
    with serve(site_dir) as url:
        for path, code in (("%00", 400), ("data/%00x", 400), ("data/", 404)):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url + path)
            assert err.value.code == code, path
        assert b"app.js" in urllib.request.urlopen(url).read()  # the site's own index still opens


def test_a_symlink_planted_in_the_site_leads_nowhere(site_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the site")
    (site_dir / "data" / "leak.txt").symlink_to(secret)
    (site_dir / "data" / "outside").symlink_to(tmp_path, target_is_directory=True)
    try:
        with serve(site_dir) as url:
            for path in ("data/leak.txt", "data/outside/secret.txt"):
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(url + path)
                assert err.value.code == 404, path
            assert urllib.request.urlopen(url + "data/site.js").read().startswith(b"window.SITE_DATA")
    finally:
        (site_dir / "data" / "leak.txt").unlink()
        (site_dir / "data" / "outside").unlink()


def test_idle_clients_hold_a_bounded_pool_and_leaving_clients_are_not_errors(site_dir, caplog):
    import threading

    with serve(site_dir) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        time.sleep(0.5)
        assert threading.active_count() - before <= 16  # the pool's workers, not one thread per connection
        for s in idle:
            s.close()
        for _ in range(5):  # ask for the biggest file and go away before reading it
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /data/site.js HTTP/1.1\r\nHost: x\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        time.sleep(0.5)
        assert b"app.js" in urllib.request.urlopen(url, timeout=30).read()  # still serving
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")], caplog.text
