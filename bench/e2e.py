"""End to end: from the last instance of a study sent by C-STORE to study.scored on a WebSocket.

    .venv/bin/python bench/e2e.py                          # 20 studies, then 100 back to back
    .venv/bin/python bench/e2e.py --latency-studies 20 --burst-studies 100 --slices 36 --quiet 5

Runs the app's real processes against the project's Postgres and Redis, but in a database of
its own (created and dropped here), a temporary media root and Redis database 13
(BENCH_REDIS_URL; emptied at the end), so a running app is never touched:

- the ASGI server as the Procfile starts it (scripts/web.sh: uvicorn, HTTP and WebSocket) on a
  free port, an ED physician's WebSocket on /ws/worklist/;
- the DICOM receiver (`manage.py dicom_receiver`) on a free port;
- one Celery worker as the Procfile starts it (prefork, concurrency 1, queues default and gpu),
  with the model ICH_MODEL_PATH names, else the shipped one.

1. Latency: --latency-studies phantom head CTs (--slices slices of 512 x 512, fresh UIDs each)
   sent one at a time, each over one association; each timed from the response to its last
   C-STORE to its study.scored event. p50 and p95, and where the time goes: the quiet period
   and the completeness check, scoring (the worker's AIResult), the event's way back.
2. Throughput and memory: --burst-studies studies sent back to back, as a busy scanner would;
   studies per minute from the first instance sent to the last study scored, and the worker's
   resident memory (VmRSS of its pool process and of the parent, /proc/<pid>/status) after each
   study is scored: first, last, max. The first is taken once the model is loaded (warm).

Prints one line per figure and a JSON line with all of them.
"""

import argparse
import base64
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DATABASE = f"bench_e2e_{os.getpid()}"
AE_TITLE = "ICHBENCH"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _environment(media_root: Path, quiet: int) -> dict[str, int]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ichweb.settings")
    os.environ["ICH_MEDIA_ROOT"] = str(media_root)
    port = os.environ.get("ICH_REDIS_PORT", "6390")
    os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:{port}/13")
    os.environ["ICH_STUDY_QUIET_SECONDS"] = str(quiet)
    os.environ["ICH_LOG_LEVEL"] = "WARNING"
    ports = {"http": _free_port(), "dicom": _free_port()}
    os.environ["ICH_DICOM_PORT"] = str(ports["dicom"])
    return ports


# --- Studies --------------------------------------------------------------------------------


class Studies:
    """Phantom head CTs as files, each study a copy of one of a few phantoms with fresh UIDs
    (rendering a phantom takes seconds; a copy, milliseconds)."""

    def __init__(self, slices: int, scratch: Path) -> None:
        import pydicom

        from inference.phantom import generate_study, write_study

        self.scratch = scratch
        kinds: list[list[str]] = [["subdural"], [], ["intraparenchymal"], ["epidural"]]
        self.templates = []
        for seed, subtypes in enumerate(kinds, start=301):
            folder = scratch / f"template-{seed}"
            paths = write_study(generate_study(seed, subtypes=subtypes, n_slices=slices), folder)
            self.templates.append([pydicom.dcmread(path) for path in paths])
            shutil.rmtree(folder)
        self.count = 0

    def write(self) -> tuple[str, list[Path]]:
        """The next study as files: (StudyInstanceUID, paths in slice order)."""
        from pydicom.uid import generate_uid

        template = self.templates[self.count % len(self.templates)]
        self.count += 1
        folder = self.scratch / f"study-{self.count:04d}"
        folder.mkdir()
        study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
        paths = []
        for index, dataset in enumerate(template):
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
            dataset.FrameOfReferenceUID = frame_uid
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            dataset.AccessionNumber = f"BENCH{self.count:05d}"
            path = folder / f"IM{index:04d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
        return study_uid, paths


def _send(port: int, paths: list[Path]) -> float:
    """C-STORE the files over one association; returns the time of the last response."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from worklist.receiver import MAXIMUM_PDU_SIZE, TCP_NODELAY_HANDLERS

    ae = AE(ae_title="BENCHSCU")
    ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=AE_TITLE, evt_handlers=list(TCP_NODELAY_HANDLERS)
    )
    if not assoc.is_established:
        raise SystemExit("the receiver refused the association")
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            if status.get("Status") != 0x0000:
                raise SystemExit(f"C-STORE refused: {status}")
        return time.time()
    finally:
        assoc.release()


# --- The live worklist ----------------------------------------------------------------------


class Worklist:
    """An ED physician's WebSocket on the live server, read in a thread of its own.

    A few lines of RFC 6455 over a plain socket, so the bench needs no WebSocket client of its
    own."""

    def __init__(self, port: int, session_key: str) -> None:
        self.scored: dict[int, float] = {}  # study id -> when its study.scored arrived
        self.changed = threading.Condition()
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws/worklist/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Origin: http://127.0.0.1:{port}\r\nCookie: sessionid={session_key}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n"
        )
        self.socket.sendall(request.encode())
        self.stream = self.socket.makefile("rb")
        status = self.stream.readline()
        while self.stream.readline() not in (b"\r\n", b""):
            pass  # the response's headers
        if b" 101 " not in status:
            raise SystemExit(f"the WebSocket was not accepted: {status!r}")
        self.socket.settimeout(None)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            opcode, payload = self._frame()
            if opcode == 0x1:  # text
                self._on_event(json.loads(payload))
            elif opcode == 0x9:  # ping: answer, or the server closes the socket
                self._send(0xA, payload)
            elif opcode == 0x8:  # close
                return

    def _frame(self) -> tuple[int, bytes]:
        head = self.stream.read(2)
        if len(head) < 2:
            return 0x8, b""
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = struct.unpack(">H", self.stream.read(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self.stream.read(8))[0]
        return opcode, self.stream.read(length)  # a server's frames are not masked

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # a client's frames are
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.socket.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") != "study.scored":
            return
        with self.changed:
            self.scored.setdefault(int(event["study_id"]), time.time())
            self.changed.notify_all()

    def wait_scored(self, study_id: int, timeout: float = 600) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: study_id in self.scored, timeout=timeout):
                raise SystemExit(f"study {study_id} was not scored within {timeout:.0f} s")
            return self.scored[study_id]


# --- The processes --------------------------------------------------------------------------


class Processes:
    def __init__(self, ports: dict[str, int], logs: Path) -> None:
        self.ports = ports
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        python = sys.executable
        web = [str(ROOT / "scripts" / "web.sh")]
        self._spawn("web", web, {"PYTHON": python, "ICH_PORT": str(self.ports["http"])})
        self._spawn("receiver", [python, "manage.py", "dicom_receiver", "--ae-title", AE_TITLE])
        worker = [python, "-m", "celery", "--app", "ichweb", "worker", "--queues", "default,gpu"]
        worker += ["--concurrency", "1", "--loglevel", "WARNING"]
        worker += ["--hostname", f"bench-{os.getpid()}@%h"]
        self._spawn("worker", worker)  # as the Procfile starts it
        self._wait_until_ready()

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.running[name] = subprocess.Popen(  # noqa: S603 - our own commands
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def _wait_until_ready(self, timeout: float = 120) -> None:
        from ichweb.celery import app

        deadline = time.monotonic() + timeout
        waiting = {"web", "receiver", "worker"}
        while waiting and time.monotonic() < deadline:
            for name, process in self.running.items():
                if process.poll() is not None:
                    raise SystemExit(f"{name} exited; see {self.logs / (name + '.log')}")
            if "web" in waiting and _listening(self.ports["http"]):
                waiting.discard("web")
            if "receiver" in waiting and _listening(self.ports["dicom"]):
                waiting.discard("receiver")
            if "worker" in waiting and app.control.ping(timeout=0.5):
                waiting.discard("worker")
            time.sleep(0.2)
        if waiting:
            raise SystemExit(f"not ready in time: {', '.join(sorted(waiting))}")

    def worker_rss_mb(self) -> dict[str, float]:
        """VmRSS of the worker's parent and of its pool process (where tasks and the model are)."""
        parent = self.running["worker"].pid
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        rss = {"parent": _rss_mb(parent), "parent_peak": _rss_mb(parent, "VmHWM")}
        if children:
            rss["pool"] = _rss_mb(int(children[0]))
            rss["pool_peak"] = _rss_mb(int(children[0]), "VmHWM")
        return rss

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """MiB of /proc's ``field``: VmRSS now, or VmHWM, the process's peak so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for process {pid}")


# --- The runs -------------------------------------------------------------------------------


def _session_of_an_ed_physician() -> str:
    from django.contrib.auth.models import Group, User
    from django.test import Client

    from worklist import services
    from worklist.roles import ED_PHYSICIAN

    user = User.objects.create_user("bench-ed-physician")
    user.groups.add(Group.objects.get_or_create(name=ED_PHYSICIAN)[0])
    services.roles_sync()
    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


def _study_id(study_uid: str) -> int:
    from worklist.models import Study

    return int(Study.objects.values_list("pk", flat=True).get(study_instance_uid=study_uid))


def _latency(studies: Studies, count: int, port: int, worklist: Worklist) -> dict[str, Any]:
    from worklist.models import AIResult

    rows = []
    for _ in range(count):
        uid, paths = studies.write()
        sent = _send(port, paths)
        study_id = _study_id(uid)
        scored = worklist.wait_scored(study_id)
        result = AIResult.objects.filter(study_id=study_id).latest("created_at")
        if result.finished_at is None:
            raise SystemExit(f"study {study_id} announced scored, its result still running")
        rows.append(
            {
                "latency": scored - sent,
                "until_scoring": result.created_at.timestamp() - sent,
                "scoring": (result.finished_at - result.created_at).total_seconds(),
                "model": float(result.timings.get("total", 0.0)),
                "event": scored - result.finished_at.timestamp(),
                "flagged": sorted(result.heatmaps),
                **{f"model_{stage}": float(s) for stage, s in result.timings.items()},
            }
        )
        shutil.rmtree(paths[0].parent)
        print(
            f"  study {study_id}: {rows[-1]['latency']:.2f} s (quiet + check "
            f"{rows[-1]['until_scoring']:.2f}, scoring {rows[-1]['scoring']:.2f}, of which model "
            f"{rows[-1]['model']:.2f}, event {rows[-1]['event']:.3f}; flagged "
            f"{', '.join(rows[-1]['flagged']) or 'none'}; model stages "
            f"{ {k[6:]: round(v, 2) for k, v in rows[-1].items() if k.startswith('model_')} })",
            flush=True,
        )
    latencies = sorted(row["latency"] for row in rows)
    return {
        "studies": count,
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(_percentile(latencies, 95), 2),
        "min_s": round(latencies[0], 2),
        "max_s": round(latencies[-1], 2),
        "median_parts_s": {
            part: round(statistics.median(row.get(part, 0.0) for row in rows), 3)
            for part in sorted({k for row in rows for k in row if k not in ("latency", "flagged")})
        },
        "flagged_studies": sum(1 for row in rows if row["flagged"]),
    }


def _percentile(ordered: list[float], percent: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


def _burst(
    studies: Studies, count: int, port: int, worklist: Worklist, processes: Processes
) -> dict[str, Any]:
    prepared = [studies.write() for _ in range(count)]
    started = time.time()
    sent: list[float] = []

    def send_all() -> None:
        for _, paths in prepared:
            sent.append(_send(port, paths))

    sender = threading.Thread(target=send_all)
    sender.start()
    rss = []
    for index, (uid, _) in enumerate(prepared):
        while len(sent) <= index:
            time.sleep(0.01)
        worklist.wait_scored(_study_id(uid))
        rss.append(processes.worker_rss_mb())
        if (index + 1) % 10 == 0:
            print(f"  {index + 1} scored, worker RSS {rss[-1]}", flush=True)
    finished = time.time()
    sender.join()
    for _, paths in prepared:
        shutil.rmtree(paths[0].parent)
    pool = [sample.get("pool", sample["parent"]) for sample in rss]
    return {
        "studies": count,
        "studies_per_minute": round(count / (finished - started) * 60, 2),
        "sending_s": round(sent[-1] - started, 1),
        "total_s": round(finished - started, 1),
        "worker_pool_rss_mb": {
            "first": round(pool[0], 1),
            "last": round(pool[-1], 1),
            # sampled after each study is scored: a study's own peak lies between samples
            "max_after_each": round(max(pool), 1),
            "after_each": [round(value, 1) for value in pool],
            # VmHWM at the end: the true peak of the process over its life (model load too)
            "peak": round(rss[-1].get("pool_peak", rss[-1]["parent_peak"]), 1),
        },
        "worker_parent_rss_mb": {
            "first": round(rss[0]["parent"], 1),
            "last": round(rss[-1]["parent"], 1),
            "max_after_each": round(max(sample["parent"] for sample in rss), 1),
            "peak": round(rss[-1]["parent_peak"], 1),
        },
    }


def _model_description() -> str:
    from inference.package import ModelPackage
    from inference.predictor import default_model_path

    path = default_model_path()
    if not path.is_file():
        raise SystemExit(f"no model at {path}: set ICH_MODEL_PATH (see README, `ich train`)")
    package = ModelPackage.load(path)
    variants = "+".join(member.variant for member in package.members)
    return (
        f"{path} ({package.name} {package.version}, {variants}, {package.preprocess.image_size} px)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-studies", type=int, default=20)
    parser.add_argument("--burst-studies", type=int, default=100, help="0: latency only")
    parser.add_argument("--slices", type=int, default=36)
    parser.add_argument("--quiet", type=int, default=5, help="ICH_STUDY_QUIET_SECONDS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        ports = _environment(Path(scratch) / "media", args.quiet)
        import django

        django.setup()
        from django.db import connection

        model = _model_description()
        original_database = connection.settings_dict["NAME"]
        connection.settings_dict["TEST"]["NAME"] = BENCH_DATABASE
        connection.creation.create_test_db(verbosity=0, autoclobber=True)
        os.environ["ICH_DB_NAME"] = BENCH_DATABASE  # the processes use the bench database
        processes = Processes(ports, Path(scratch))
        try:
            figures = _run(args, model, ports, processes, Path(scratch))
        finally:
            processes.stop()
            logs = {name: (Path(scratch) / f"{name}.log") for name in processes.running}
            _show_errors(logs)
            connection.close()
            connection.creation.destroy_test_db(original_database, verbosity=0)
            _empty_redis(os.environ["REDIS_URL"])
    print(json.dumps(figures))


def _run(
    args: argparse.Namespace,
    model: str,
    ports: dict[str, int],
    processes: Processes,
    scratch: Path,
) -> dict[str, Any]:
    print(
        f"{os.cpu_count()} CPUs ({platform.node()}, load {os.getloadavg()[0]:.1f}); "
        f"model {model}; {args.slices} slices of 512 x 512 per study; quiet period "
        f"{args.quiet} s; one worker (prefork, concurrency 1)",
        flush=True,
    )
    studies = Studies(args.slices, scratch)
    processes.start()
    worklist = Worklist(ports["http"], _session_of_an_ed_physician())
    print("warming up (the worker loads the model on its first study)", flush=True)
    uid, paths = studies.write()
    _send(ports["dicom"], paths)
    worklist.wait_scored(_study_id(uid))
    print(f"latency, {args.latency_studies} studies one at a time:", flush=True)
    latency = _latency(studies, args.latency_studies, ports["dicom"], worklist)
    print(
        f"last instance sent -> study.scored on the WebSocket: p50 {latency['p50_s']} s, "
        f"p95 {latency['p95_s']} s (target p50 <= {args.quiet + 10} s: quiet period + 10 s); "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    burst = None
    if args.burst_studies:
        print(f"burst, {args.burst_studies} studies back to back:", flush=True)
        burst = _burst(studies, args.burst_studies, ports["dicom"], worklist, processes)
        rss = burst["worker_pool_rss_mb"]
        print(
            f"{burst['studies_per_minute']} studies per minute with one worker; worker pool "
            f"process RSS after each study: first {rss['first']} MiB, last {rss['last']} MiB, "
            f"highest {rss['max_after_each']} MiB; its true peak (VmHWM) {rss['peak']} MiB; "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return {
        "bench": "e2e",
        "cpus": os.cpu_count(),
        "model": model,
        "slices": args.slices,
        "quiet_s": args.quiet,
        "latency": latency,
        "burst": burst,
    }


def _show_errors(logs: dict[str, Path]) -> None:
    for name, path in logs.items():
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        errors = [line for line in lines if "ERROR" in line or "Traceback" in line]
        if errors:
            print(f"{name}: {len(errors)} error lines, e.g. {errors[0][:300]}", file=sys.stderr)


def _empty_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


if __name__ == "__main__":
    main()
