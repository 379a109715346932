"""What a hostile or careless file must not do: write outside a run through a link, leak a file
into a report, drive the terminal, delete a user's file, exhaust memory, hang a reader, or reach
the explorer's server from another site. Each attack here is one that ran through before."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import socket
import struct
import threading
import time
import zipfile

import numpy as np
import pytest
from conftest import synthetic_digits
from PIL import Image
from safetensors.torch import save_file

import vaelab
from vaelab import plots, runs
from vaelab.cli import main, shown
from vaelab.config import merge
from vaelab.data import load
from vaelab.errors import DataError, RunError
from vaelab.report import write_report


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch run on 600 synthetic digits (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("security")
    x_train, y_train = synthetic_digits(600, seed=1)
    x_test, y_test = synthetic_digits(200, seed=2)
    data = root / "tiny.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    config = merge(
        vaelab.preset("seed"),
        {"data": {"source": str(data)}, "model": {"hidden": [32]}, "train": {"epochs": 1, "batch_size": 100}},
        where="test",
    )
    vaelab.train(config, root / "run")
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture
def victim(tmp_path):
    """A folder of the user's, outside any run."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "samples.png").write_text("USER DATA")
    (folder / "state.pt").write_text("USER DATA")
    return folder


# --- links in a run --------------------------------------------------------------------------


def test_a_figures_folder_that_is_a_link_is_refused_and_its_target_kept(run, victim, capsys):
    shutil.rmtree(run / "figures", ignore_errors=True)
    (run / "figures").symlink_to(victim)
    for verb in ("plot", "report"):
        assert main([verb, str(run)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "figures: is a link" in err, err
    assert (victim / "samples.png").read_text() == "USER DATA"
    assert sorted(p.name for p in victim.iterdir()) == ["samples.png", "state.pt"]


def test_a_checkpoint_folder_that_is_a_link_is_refused_on_resume(run, victim, capsys):
    shutil.rmtree(run / "checkpoint")
    (run / "checkpoint").symlink_to(victim)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint: is a link" in err, err
    assert (victim / "state.pt").read_text() == "USER DATA"


def test_the_report_embeds_only_plain_png_files(run, tmp_path):
    main(["plot", str(run)])
    secret = tmp_path / "id_rsa"
    secret.write_text("secret-key-material")
    figures = run / "figures"
    (figures / "zz_leak.png").symlink_to(secret)
    (figures / "zz_text.png").write_text("not a png")
    os.mkfifo(figures / "zz_fifo.png")  # reading it would block the report for ever
    (figures / "samples.png").unlink()
    (figures / "samples.png").symlink_to(secret)  # a figure vaelab draws, replaced by a link
    text = write_report(run).read_text()
    assert "zz_leak" not in text and "zz_text" not in text and "zz_fifo" not in text
    assert "c2VjcmV0" not in text  # base64 of "secret"
    assert not (figures / "samples.png").is_symlink()  # drawn again, in place of the link
    assert (figures / "samples.png").read_bytes().startswith(b"\x89PNG")
    assert secret.read_text() == "secret-key-material"
    assert all(f'id="{name}"' in text for name in plots.FIGURES)  # every figure of the run is there


def test_the_reports_commands_quote_the_run_path(run, tmp_path):
    odd = tmp_path / "a b;rm -rf x"
    run.rename(odd)
    text = write_report(odd).read_text()
    assert "vaelab evaluate &#x27;" in text or "vaelab evaluate '" in text  # shell-quoted
    assert f"vaelab evaluate {odd}<" not in text


# --- the terminal ------------------------------------------------------------------------------


def test_shown_writes_every_control_character_as_an_escape():
    text = "a\x1b]0;pwned\x07b\x1b[2J\nc\td\re\x9bf\u202eg\u2028h\x7f"
    one = shown(text)
    assert one == "a\\x1b]0;pwned\\x07b\\x1b[2J\\nc\\td\\re\\x9bf\\u202eg\\u2028h\\x7f"
    assert all(c.isprintable() for c in one)
    assert shown("a\nb\tc\x1b", lines=True) == "a\nb\tc\\x1b"
    assert shown("digits 0–9, ü, 数字, 👩‍👧") == "digits 0–9, ü, 数字, 👩‍👧"  # printable text is kept
    assert shown(os.fsdecode(b"a\x9b2J.png")) == "a\\x9b2J.png"  # a byte that is not UTF-8


def test_escape_sequences_in_a_file_name_reach_the_terminal_escaped(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    name = "b\x1b]0;pwned\x07\x1b[2J.png"
    (folder / name).write_bytes(b"junk")
    (folder / "a.png").write_bytes(b"junk")
    assert main(["data", "info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;pwned\\x07" in err
    assert len(err.splitlines()) == 1


def test_a_success_line_shows_a_path_escaped(run, tmp_path, capsys):
    out = tmp_path / "s\x1b[2J.png"
    assert main(["sample", str(run), "-n", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "s\\x1b[2J.png" in printed
    assert out.is_file()


# --- the lock ---------------------------------------------------------------------------------


def test_a_lock_file_that_is_not_vaelabs_is_refused_and_kept(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".lock").write_text("my own notes")
    with pytest.raises(RunError, match="not a lock vaelab wrote"):
        with runs.locked(folder):
            pass
    assert (folder / ".lock").read_text() == "my own notes"


def _dead_pid() -> int:
    pid = 2**22 - 1
    while runs._pid_alive(pid):
        pid -= 1
    return pid


@pytest.mark.parametrize("holder", ["empty", "dead process here", "other machine"])
def test_an_old_empty_lock_or_one_of_a_dead_process_is_taken_over(tmp_path, holder):
    folder = tmp_path / "out"
    folder.mkdir()
    content = {
        "empty": "",
        "dead process here": json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}),
        "other machine": json.dumps({"pid": os.getpid(), "host": "not-" + socket.gethostname(), "since": 0}),
    }[holder]
    (folder / ".lock").write_text(content)
    old = time.time() - runs.EMPTY_LOCK_SECONDS - 1
    os.utime(folder / ".lock", (old, old))
    with runs.locked(folder):
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    assert not (folder / ".lock").exists()


def test_a_live_processs_lock_and_a_new_empty_one_are_refused(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(RunError, match=f"held by a running trainer \\(process {os.getpid()}"):
        with runs.locked(folder):
            pass
    (folder / ".lock").write_text("")  # a trainer between creating the lock and writing it
    with pytest.raises(RunError, match="a trainer is starting in it"):
        with runs.locked(folder):
            pass
    assert (folder / ".lock").exists()


# --- memory -----------------------------------------------------------------------------------


def _zip_bomb(path, shape):
    """An .npz whose x_train is `shape` of zeros, deflated (a few kB per 100 MB)."""
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    text = repr(header).encode("latin1")
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x_train.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text)
            block = bytes(2**20)
            for _ in range(int(np.prod(shape)) // len(block)):
                f.write(block)
        z.writestr("x_test.npy", b"")


def test_an_npz_larger_than_memory_once_decompressed_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    _zip_bomb(path, (4 * 1024, 32, 32))  # 4 MiB of zeros in about 4 kB
    assert path.stat().st_size < 50_000
    monkeypatch.setattr("vaelab.perf.available_memory", lambda: 2**20)
    with pytest.raises(DataError, match=r"'x_train' holds 4\.0 MiB once decompressed, more than the 1\.0 Mi"):
        load(path)


@pytest.mark.parametrize("version", [1, 2])
def test_the_memory_cgroups_room_is_its_limit_less_its_processes_own_memory(tmp_path, version):
    from vaelab.perf import _cgroup_room

    proc = tmp_path / "cgroup"
    if version == 2:
        proc.write_text("0::/job/42\n")
        folder = tmp_path / "job" / "42"
        limit, stat = "memory.max", "anon 1048576\nfile 999999999\n"  # page cache is not held
    else:
        proc.write_text("5:cpu,cpuacct:/\n4:memory:/job/42\n0::/\n")
        folder = tmp_path / "memory" / "job" / "42"
        limit, stat = "memory.limit_in_bytes", "cache 999999999\nrss 1\ntotal_rss 1048576\n"
    folder.mkdir(parents=True)
    (folder / limit).write_text(f"{8 * 2**20}\n")
    (folder / "memory.stat").write_text(stat)
    assert _cgroup_room(proc, tmp_path) == 7 * 2**20
    (folder / limit).write_text("max\n" if version == 2 else f"{2**63 - 4096}\n")  # no limit
    assert _cgroup_room(proc, tmp_path) is None


def test_a_gzipped_idx_file_larger_than_memory_is_refused_before_reading(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    folder.mkdir()
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4I", 0x803, 4096, 32, 32) + bytes(4096 * 32 * 32))
    monkeypatch.setattr("vaelab.perf.available_memory", lambda: 2**20)
    from vaelab.data.idx import read_idx

    with pytest.raises(DataError, match=r"declares 4\.0 MiB of data, more than the 1\.0 MiB of memory"):
        read_idx(folder / "train-images-idx3-ubyte.gz", "images")
    monkeypatch.setattr("vaelab.perf.available_memory", lambda: None)  # unknown: read as before
    assert read_idx(folder / "train-images-idx3-ubyte.gz", "images").shape == (4096, 32, 32)


def test_an_image_folder_larger_than_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (64, 64)).save(folder / f"{i}.png")
    monkeypatch.setattr("vaelab.perf.available_memory", lambda: 10_000)  # 4 x 64 x 64 = 16 kB
    monkeypatch.setattr("vaelab.data.folder._read", lambda *a: pytest.fail("decoded before the check"))
    want = r"4 images of 64x64 need 16\.0 KiB, more than the 9\.8 KiB .*--image-size"
    with pytest.raises(DataError, match=want):
        load(folder)


def test_an_image_of_too_many_pixels_is_refused_in_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("L", (64, 64)).save(folder / f"{name}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # Pillow warns above this, errs at twice it
    with pytest.raises(DataError, match=r"image .*\.png: cannot be read as an image \(Image size \(4096 pix"):
        load(folder)


def test_a_pipe_among_the_images_is_skipped_not_read(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("L", (8, 8), color=40).save(folder / f"{name}.png")
    os.mkfifo(folder / "z.png")  # reading it would block for ever
    found = []
    reader = threading.Thread(target=lambda: found.append(load(folder)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if reader.is_alive():  # (unblock the reader: open the pipe's other end)
        with open(folder / "z.png", "wb"):
            pass
        pytest.fail("load() blocked on a pipe named z.png")
    assert len(found[0].x_train) + len(found[0].x_test) == 3


# --- weights ---------------------------------------------------------------------------------


def test_float64_weights_beyond_float32s_range_are_refused_on_load(run):
    state = {k: v.double() for k, v in vaelab.load(run).state_dict().items()}
    name = next(iter(state))
    state[name].view(-1)[0] = 1e300  # finite in float64, infinite once read as float32
    save_file(state, run / "model.safetensors")
    with pytest.raises(RunError, match=f"{name} holds values beyond the range of float32"):
        vaelab.load(run)


def test_weights_that_do_not_fit_config_json_are_refused_before_the_model_is_built(run, monkeypatch):
    """A config.json that asks for huge layers (within the bounds) must not get them allocated
    before the weights are found not to fit: only a model on the meta device is built."""
    import vaelab.models

    config = json.loads((run / "config.json").read_text())
    config["model"]["hidden"] = [1_000_000]
    (run / "config.json").write_text(json.dumps(config))
    real, built = vaelab.models.build_model, []

    def spy(model_config):
        model = real(model_config)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(vaelab.models, "build_model", spy)
    with pytest.raises(RunError, match="weights do not fit the architecture in config.json"):
        vaelab.load(run)
    assert built == ["meta"]


# --- the explorer's server -------------------------------------------------------------------


@pytest.fixture(params=["127.0.0.1", "127.0.0.2", "::1"])
def server(tmp_path, request):
    """The explorer's server on a loopback address (any of 127.0.0.0/8 is this machine)."""
    from vaelab.cli.explore_cmd import make_server

    page = tmp_path / "explorer.html"
    page.write_text("<p>the page</p>")
    if request.param == "::1" and not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")
    srv = make_server(page, request.param, 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, page
    srv.shutdown()
    srv.server_close()


def _get(srv, host_header=None):
    conn = http.client.HTTPConnection(srv.server_address[0], srv.server_address[1], timeout=10)
    headers = {} if host_header is None else {"Host": host_header}
    conn.request("GET", "/", headers=headers)
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:80", "10.0.0.1", "localhost.evil"])
def test_the_server_refuses_requests_for_another_host_name(server, host, capfd):
    srv, _ = server
    status, _, body = _get(srv, host)
    assert status == 403 and b"the page" not in body
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and f"refused a request for host {host}" in err


@pytest.mark.parametrize(
    "host", [None, "{addr}:{port}", "{addr}", "localhost:{port}", "LOCALHOST", "localhost.:{port}",
             "127.0.0.1:{port}", "[::1]:{port}", "[::1]"],
)
def test_the_server_answers_requests_for_this_machine(server, host):
    """Including the very URL `explore --serve` prints for its address."""
    srv, _ = server
    addr, port = srv.server_address[:2]
    in_url = f"[{addr}]" if ":" in addr else addr
    status, headers, body = _get(srv, host and host.format(addr=in_url, port=port))
    assert status == 200 and body == b"<p>the page</p>"
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"


def test_a_page_removed_while_serving_gives_a_404_and_one_line(server, capfd):
    srv, page = server
    page.unlink()
    status, _, _ = _get(srv)
    assert status == 404
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot be read" in err and "Traceback" not in err


# --- the model card ----------------------------------------------------------------------------


def test_the_model_card_escapes_html_in_what_it_shows(run, tmp_path):
    pytest.importorskip("onnx")
    odd = tmp_path / "<img src=x onerror=alert(3)>"
    run.rename(odd)
    assert main(["export", str(odd), "--out", str(tmp_path / "exported")]) == 0
    card = (tmp_path / "exported" / "model-card.md").read_text()
    outside_code = "".join(card.split("```")[::2])  # (HTML is not read inside fenced code)
    assert "<img" not in outside_code and "# &lt;img src=x onerror=alert(3)&gt;" in outside_code


def test_no_code_path_can_unpickle_without_restriction():
    """A reading of the source, not an attack: every torch.load passes weights_only=True, every
    np.load allow_pickle=False, and pickle is used only through the restricted unpickler of the
    checksum-pinned MNIST file (its refusals are tested in test_data.py)."""
    import ast
    import pathlib

    def keyword(call, name):
        given = [k.value for k in call.keywords if k.arg == name]
        return given[0].value if given and isinstance(given[0], ast.Constant) else None

    src = pathlib.Path(vaelab.__file__).parent
    seen = {"torch.load": 0, "np.load": 0}
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy", "pickle"):
                assert not {"load", "loads"} & {a.name for a in node.names}, (path, "imports load by name")
            if isinstance(node, ast.Import) and any(a.name == "pickle" for a in node.names):
                assert path.name == "mnist.py", (path, "imports pickle")
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            name = f"{owner}.{node.func.attr}"
            if name == "torch.load":
                seen[name] += 1
                assert keyword(node, "weights_only") is True, (path, node.lineno)
            elif name in ("np.load", "numpy.load"):
                seen["np.load"] += 1
                assert keyword(node, "allow_pickle") is False, (path, node.lineno)
            elif owner == "pickle":
                assert path.name == "mnist.py" and node.func.attr in ("Unpickler", "UnpicklingError"), (
                    path, node.lineno)
    assert seen["torch.load"] >= 1 and seen["np.load"] >= 2  # (the calls this test is about exist)
