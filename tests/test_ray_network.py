"""Ray on a school network (issue 30, item 4), against real Ray: the app's own local Ray
(started from a script thread, which it outlives) and the README's lecture-hall head listen
on 127.0.0.1 only and require Ray's token; a head without token auth is refused in one line
and the app trains in its own process. (tests/test_ray.py: a process without the session
head's token cannot join it.)

Every listening TCP socket of a Ray's processes is read with psutil. Runs that start Ray
do it in child processes, so this pytest process never imports Ray here."""
import contextlib
import importlib.util
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from harness.servers import stop_group

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None and not os.environ.get("PEFT_REQUIRE_BROWSER"),
                                reason="ray is not installed (pip install -r requirements-ray.txt)")


def listening(pids):
    """{(process name, address, port)} of every TCP socket these processes listen on."""
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):  # one that exited meanwhile listens on nothing
            p = psutil.Process(pid)
            found |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
    return found


def process_tree(pid):
    """A process and all it started: a `ray start --block`, its GCS, raylet, agents and the
    raylet's workers (each in a process group of its own)."""
    root = psutil.Process(pid)
    return [pid] + [p.pid for p in root.children(recursive=True)]


def off_loopback(sockets):
    """The sockets another machine could reach (0.0.0.0, ::, a network address)."""
    def loopback(ip):
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too
    return sorted(s for s in sockets if not loopback(s[1]))


def stop(proc):
    """`ray start --block` stops its cluster on SIGTERM; then whatever is left of its group."""
    stop_group(proc, grace=20, group=False)


LOCAL = """
import json, os, sys, threading
sys.path.insert(0, "tests")
import peftcore
from peftcore import LoraConfig
from peftcore.service.executors import RunSpec
from peftcore.service.ray_executor import _check_token_auth, ray_manager
from test_ray_network import listening, process_tree
box = []
t = threading.Thread(target=lambda: box.append(ray_manager(num_cpus=1, name="network-test")))
t.start(); t.join()  # the thread that started Ray has ended, as a Streamlit script run does
spec = RunSpec(LoraConfig(r=1, target_modules=("q",)).to_dict(), "times_3", fingerprint=peftcore.fingerprint(peftcore.load_base()),
               train=dict(steps=2, batch_size=8, eval_every=2, device="cpu"))
run = box[0].start(spec, owner="a").wait(120)
import ray  # only now: connect sets what Ray reads when it is imported
gcs = ray.get_runtime_context().gcs_address
_check_token_auth(gcs)  # raises unless its GCS refuses a process without the token and opens to its own
print(json.dumps(dict(status=run.status, error=run.error, gcs=gcs, sockets=sorted(listening(process_tree(os.getpid()))))))
"""


def test_the_apps_local_ray_outlives_its_thread_listens_on_loopback_only_and_requires_its_token():
    """PEFT_EXECUTOR=ray without RAY_ADDRESS: the Ray the app starts from a script thread
    trains after that thread ended, and every port it opens (GCS, raylet, object manager,
    agents, the driver's and the workers' own) is on 127.0.0.1, read after a run, so the
    worker processes listen too. Its token is this test's, not ~/.ray's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # as a web server's own
    env["RAY_AUTH_TOKEN"] = os.urandom(32).hex()  # else Ray writes one to ~/.ray/auth_token
    done = subprocess.run([sys.executable, "-c", LOCAL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["status"] == "done" and got["gcs"].startswith("127.0.0.1:"), got
    names = {name for name, _, _ in got["sockets"]}
    assert {"gcs_server", "raylet", "ray::RunService", "ray::Worker"} <= names, got  # the 7 ports issue 30 saw
    assert int(got["gcs"].rpartition(":")[2]) in {port for _, _, port in got["sockets"]}
    assert off_loopback(map(tuple, got["sockets"])) == [], got["sockets"]


def test_the_readmes_head_listens_on_loopback_only_and_is_joined_by_address_alone(tmp_path):
    """The README's lecture-hall head (`ray get-auth-token --generate`, then `ray start --head
    --node-ip-address=127.0.0.1` with RAY_AUTH_MODE=token and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0;
    here on a free port and its own temp dir): every port on 127.0.0.1, and a web server joins
    it with RAY_ADDRESS alone (the token from ~/.ray/auth_token)."""
    from harness.servers import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # its own ~/.ray/auth_token
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, cwd=ROOT, capture_output=True, timeout=60, check=True)
    assert (tmp_path / ".ray" / "auth_token").exists()
    head_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0"}
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", f"--temp-dir={tempfile.mkdtemp(prefix='ray-')}"],
                            env=head_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        code = f"from peftcore.service.ray_executor import connect; connect('127.0.0.1:{port}'); print('joined')"
        deadline = time.time() + 90
        while True:  # until the head's GCS answers
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            assert head.poll() is None and time.time() < deadline, "the head did not start"
            time.sleep(0.5)
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert "joined" in done.stdout, done.stderr[-2000:]
        sockets = listening(process_tree(head.pid))
        assert port in {p for _, _, p in sockets} and off_loopback(sockets) == [], sockets
    finally:
        stop(head)


REFUSED = """
import logging, ui
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
print(type(ui.make_manager("ray")).__name__)
"""


def test_a_head_without_token_auth_is_refused_in_one_line_and_the_app_trains_in_process():
    """A head started without token auth (`ray start --head` with no token on a fresh
    machine): anyone who reaches it runs code as its user. The app refuses it, says why in
    one line, and trains in its own process."""
    from harness.servers import ray_head
    with ray_head(num_cpus=1, auth=False) as head:
        assert off_loopback(listening(process_tree(head.pid))) == []
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_ADDRESS": head.address}
        t0 = time.time()
        done = subprocess.run([sys.executable, "-c", REFUSED], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert done.stdout.strip().splitlines()[-1:] == ["RunManager"], done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "training runs in this web process" in errors[0], done.stderr[-3000:]
    assert (f"the Ray head at {head.address} does not require token authentication: anyone on the network "
            "could run code on it; start it as the README says") in errors[0]
    assert "Traceback" not in done.stderr and time.time() - t0 < 60
