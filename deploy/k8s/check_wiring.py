#!/usr/bin/env python3
"""Checks that rendered nanoinfer manifests are wired together.

    check_wiring.py RENDERED.yaml...      (one file per overlay, e.g. the
                                           output of `kubectl kustomize DIR`)

Each file is checked on its own; exit 1 with one line per violation, 0 when
clean, 2 on a usage or environment error. What it checks, per file:

  selectors   every Service, Deployment/StatefulSet, PodDisruptionBudget and
              NetworkPolicy selector (and NetworkPolicy `from` pod selectors)
              matches the labels of at least one pod template (a workload:
              its own template); a ServiceMonitor selects a Service that has
              the named port; a StatefulSet's serviceName is a headless
              Service.
  ports       every Service targetPort (number or name) is a containerPort of
              every pod it selects; NetworkPolicy ports are containerPorts of
              the pods the policy selects; `prometheus.io/port` is a
              containerPort.
  binaries    a container's binary is its command[0]: containers of the
              nanoinfer image must set `command` (the manifests do not rely on
              the image's entrypoint). For nanoinfer-coordinator,
              nanoinfer-worker and nanoinfer, `$BIN_DIR/<binary> --help` gives
              the env vars the binary reads and their defaults; for etcd, its
              listen flags. Then:
              - every NANOINFER_* env var set (env and envFrom ConfigMaps) is
                one that the binary's --help lists (a binary whose --help
                cannot be run takes none);
              - containerPorts equal the ports the binary listens on
                (NANOINFER_LISTEN / NANOINFER_METRICS_LISTEN, which must be
                set: the image's ENV sets NANOINFER_LISTEN for every binary;
                etcd's --listen-*-urls), NANOINFER_ADVERTISE's port is the
                listen port;
              - probes: gRPC probes on the gRPC listen port and only while
                that port is plaintext (kubelet gRPC probes cannot do TLS),
                HTTP probes on the metrics port, tcpSocket on a listened port;
              - terminationGracePeriodSeconds > NANOINFER_GRACE_PERIOD (or
                the --help default, 20) + any preStop sleep;
              - NANOINFER_THREADS equals the CPU limit;
              - file paths in NANOINFER_* vars lie under a volumeMount;
              - etcd / OTLP endpoint URLs name a Service and port of the
                render (https exactly when NANOINFER_ETCD_CA is set);
              - `$(VAR)` references name a variable defined before them.
  image       containers of the nanoinfer image use the reference that
              scripts/build-image tags: the first line of deploy/image-name
              when that file exists, else nanoinfer:<[workspace.package]
              version of Cargo.toml>, else nanoinfer:0.1.0 (NANOINFER_IMAGE
              overrides all three).
  hygiene     the app's pods (label app.kubernetes.io/name=nanoinfer): name
              and component labels, scrape annotations, readiness and
              liveness probes on long-running containers, cpu and memory
              requests and limits, securityContext (non-root uid 10001,
              read-only root, no privilege escalation, capabilities dropped,
              RuntimeDefault seccomp), volumeMounts that name a volume;
              namespaced objects all carry a namespace when any does.

Needs PyYAML (`pip install pyyaml`). Importable: check_documents(docs, ...)
returns the list of violations.
"""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_BIN_DIR = "/var/cache/nanoinfer/target-x86-64-v3/release"  # deploy/k8s/validate passes BIN_DIR
HELP_BINARIES = ("nanoinfer-coordinator", "nanoinfer-worker", "nanoinfer")
APP_NAME = "nanoinfer"
APP_UID = 10001
DEFAULT_TERMINATION_GRACE = 30  # Kubernetes' default
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod")
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass", "CSIDriver",
    "APIService", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
}
# Which env var turns TLS on for the binary's own gRPC listen port.
TLS_SWITCH = {"nanoinfer-coordinator": "NANOINFER_TLS_CERT", "nanoinfer-worker": "NANOINFER_CLUSTER_CERT"}
ETCD_LISTEN_FLAGS = ("--listen-client-urls", "--listen-peer-urls", "--listen-metrics-urls")
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expected_image():
    """The image reference scripts/build-image tags (see the module doc)."""
    if os.environ.get("NANOINFER_IMAGE"):
        return os.environ["NANOINFER_IMAGE"].strip()
    name_file = REPO / "deploy" / "image-name"
    if name_file.is_file():
        for line in name_file.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return line.strip()
    try:
        import tomllib

        with open(REPO / "Cargo.toml", "rb") as f:
            version = tomllib.load(f)["workspace"]["package"]["version"]
        return f"nanoinfer:{version}"
    except Exception:  # no tomllib (Python < 3.11), no Cargo.toml, no version
        return "nanoinfer:0.1.0"


def image_repo(image):
    """`reg:5000/team/nanoinfer:0.1.0@sha256:...` -> `nanoinfer`."""
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def parse_help(text):
    """{ENV_VAR: default or None} from a clap --help text."""
    envs = {}
    # One block per option: a line that starts (indented) with --flag or -x, --flag.
    for block in re.split(r"\n(?=\s+(?:-\w, )?--[a-z])", text):
        default = re.search(r"\[default: ([^\]]*)\]", block)
        for m in re.finditer(r"\[env: ([A-Z][A-Z0-9_]*)(?:=[^\]]*)?\]", block):
            envs[m.group(1)] = default.group(1) if default else None
    return envs


@functools.lru_cache(maxsize=None)
def binary_help(bin_dir, name):
    """parse_help of `BIN_DIR/name --help`, or None when it cannot be run."""
    path = os.path.join(bin_dir, name)
    if not os.access(path, os.X_OK):
        return None
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return None
    return parse_help(out.stdout)


def quantity_to_cores(q):
    q = str(q)
    if q.endswith("m"):
        return int(q[:-1]) / 1000
    return float(q)


def port_of(address):
    """Port of `host:port` / `[::]:port`, or None."""
    try:
        return int(str(address).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def selector_matches(sel, labels):
    """A LabelSelector ({matchLabels, matchExpressions}); {} matches all."""
    if sel is None:
        return False
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def map_selector_matches(sel, labels):
    """A Service's plain map selector."""
    return all(labels.get(k) == v for k, v in (sel or {}).items())


class Template:
    """A pod template and where it comes from."""

    def __init__(self, owner, template, claim_names=()):
        self.owner = owner
        self.kind = owner["kind"]
        self.name = owner["metadata"]["name"]
        self.ns = owner["metadata"].get("namespace")
        self.meta = template.get("metadata") or {}
        self.labels = self.meta.get("labels") or {}
        self.spec = template.get("spec") or {}
        self.claim_names = set(claim_names)

    @property
    def where(self):
        return f"{self.kind}/{self.name}"

    def containers(self, init=True):
        out = list(self.spec.get("containers") or [])
        if init:
            out += [dict(c, _init=True) for c in self.spec.get("initContainers") or []]
        return out

    def declares_port(self, port, protocol="TCP"):
        """Whether some container declares `port` (number or name)."""
        return resolve_port(self.containers(init=False), port, protocol) is not None


def resolve_port(containers, port, protocol="TCP"):
    """The number of a containerPort given by number or name, or None."""
    for c in containers:
        for p in c.get("ports") or []:
            if p.get("protocol", "TCP") != protocol:
                continue
            if isinstance(port, int) and p.get("containerPort") == port:
                return port
            if isinstance(port, str) and p.get("name") == port:
                return p.get("containerPort")
            if isinstance(port, str) and port.isdigit() and p.get("containerPort") == int(port):
                return int(port)
    return None


def pod_templates(doc):
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Pod":
        return [Template(doc, {"metadata": doc.get("metadata"), "spec": spec})]
    if kind == "CronJob":
        tpl = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
        return [Template(doc, tpl)] if tpl else []
    if kind in WORKLOAD_KINDS and spec.get("template"):
        claims = [c["metadata"]["name"] for c in spec.get("volumeClaimTemplates") or []]
        return [Template(doc, spec["template"], claims)]
    return []


class Checker:
    def __init__(self, docs, bin_dir=DEFAULT_BIN_DIR, image=None, source="<input>"):
        self.docs = [d for d in docs if isinstance(d, dict) and d.get("kind")]
        self.bin_dir = bin_dir
        self.image = image or expected_image()
        self.source = source
        self.errors = []
        self.notes = []
        self.checks = 0
        self.templates = [t for d in self.docs for t in pod_templates(d)]
        self.services = [d for d in self.docs if d["kind"] == "Service"]
        self.configmaps = {
            (d["metadata"].get("namespace"), d["metadata"]["name"]): d
            for d in self.docs if d["kind"] == "ConfigMap"
        }

    # -- plumbing ---------------------------------------------------------
    def check(self, ok, where, message):
        self.checks += 1
        if not ok:
            self.errors.append(f"{where}: {message}")
        return ok

    def note(self, message):
        if message not in self.notes:
            self.notes.append(message)

    @staticmethod
    def ns(doc):
        return doc["metadata"].get("namespace")

    def templates_in(self, ns):
        return [t for t in self.templates if t.ns == ns]

    # -- the checks -------------------------------------------------------
    def run(self):
        self.check_namespaces()
        for d in self.docs:
            kind = d["kind"]
            where = f"{kind}/{d['metadata'].get('name')}"
            if kind == "Service":
                self.check_service(d, where)
            elif kind == "PodDisruptionBudget":
                self.check_pdb(d, where)
            elif kind == "NetworkPolicy":
                self.check_network_policy(d, where)
            elif kind == "ServiceMonitor":
                self.check_service_monitor(d, where)
            if kind in WORKLOAD_KINDS and kind != "Pod":
                self.check_workload(d, where)
        for t in self.templates:
            self.check_template(t)
        return self.errors

    def check_namespaces(self):
        seen, namespaced = {}, [d for d in self.docs if d["kind"] not in CLUSTER_SCOPED]
        for d in self.docs:
            key = (d["kind"], self.ns(d), d["metadata"].get("name"))
            self.check(key not in seen, f"{d['kind']}/{key[2]}", "defined twice")
            seen[key] = d
        if any(self.ns(d) for d in namespaced):
            for d in namespaced:
                self.check(self.ns(d), f"{d['kind']}/{d['metadata']['name']}",
                           "has no namespace while the rest of the render has one")

    def check_workload(self, d, where):
        spec = d.get("spec") or {}
        sel = spec.get("selector")
        if d["kind"] == "CronJob" or (d["kind"] == "Job" and not sel):
            return
        tpl = pod_templates(d)[0]
        if self.check(sel and (sel.get("matchLabels") or sel.get("matchExpressions")), where,
                      "has an empty selector"):
            self.check(selector_matches(sel, tpl.labels), where,
                       f"selector {sel} does not match its pod template's labels {tpl.labels}")
        if d["kind"] == "StatefulSet":
            name = spec.get("serviceName")
            svc = [s for s in self.services if s["metadata"]["name"] == name and self.ns(s) == self.ns(d)]
            if self.check(svc, where, f"serviceName {name!r} is not a Service of this render"):
                self.check((svc[0].get("spec") or {}).get("clusterIP") == "None", where,
                           f"serviceName {name!r} is not a headless Service (clusterIP: None)")

    def check_service(self, svc, where):
        spec = svc.get("spec") or {}
        sel = spec.get("selector")
        if not sel:
            self.note(f"{where}: no selector (external endpoints), not checked")
            return
        pods = [t for t in self.templates_in(self.ns(svc)) if map_selector_matches(sel, t.labels)]
        if not self.check(pods, where, f"selector {sel} matches no pod template"):
            return
        for p in spec.get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            proto = p.get("protocol", "TCP")
            for t in pods:
                self.check(t.declares_port(target, proto), where,
                           f"port {p.get('name') or p.get('port')}: targetPort {target!r} is not a "
                           f"containerPort of {t.where}")

    def check_pdb(self, pdb, where):
        sel = (pdb.get("spec") or {}).get("selector")
        self.check(any(selector_matches(sel, t.labels) for t in self.templates_in(self.ns(pdb))),
                   where, f"selector {sel} matches no pod template")

    def check_network_policy(self, np, where):
        spec = np.get("spec") or {}
        sel = spec.get("podSelector") or {}
        ns = self.ns(np)
        pods = [t for t in self.templates_in(ns) if selector_matches(sel, t.labels)]
        if not self.check(pods, where, f"podSelector {sel} matches no pod template"):
            return
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for i, rule in enumerate(spec.get(direction) or []):
                for peer in rule.get(peers_key) or []:
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        psel = peer["podSelector"]
                        self.check(any(selector_matches(psel, t.labels) for t in self.templates_in(ns)),
                                   where, f"{direction}[{i}].{peers_key} podSelector {psel} matches "
                                   "no pod template")
                if direction != "ingress":
                    continue
                for p in rule.get("ports") or []:
                    if "port" not in p:
                        continue
                    for t in pods:
                        self.check(t.declares_port(p["port"], p.get("protocol", "TCP")), where,
                                   f"ingress[{i}] port {p['port']!r} is not a containerPort of {t.where}")

    def check_service_monitor(self, sm, where):
        spec = sm.get("spec") or {}
        nsel = spec.get("namespaceSelector") or {}
        if nsel.get("any"):
            namespaces = None
        else:
            namespaces = set(nsel.get("matchNames") or [self.ns(sm)])
        svcs = [s for s in self.services
                if (namespaces is None or self.ns(s) in namespaces)
                and selector_matches(spec.get("selector") or {}, s["metadata"].get("labels") or {})]
        if not self.check(svcs, where, f"selector {spec.get('selector')} matches no Service"):
            return
        for ep in spec.get("endpoints") or []:
            if "port" in ep:
                self.check(any(p.get("name") == ep["port"] for s in svcs for p in s["spec"].get("ports") or []),
                           where, f"endpoint port {ep['port']!r} is not a port name of any Service it selects")

    # -- pod templates and containers ------------------------------------
    def check_template(self, t):
        is_app = t.labels.get("app.kubernetes.io/name") == APP_NAME
        volumes = {v.get("name") for v in t.spec.get("volumes") or []} | t.claim_names
        for c in t.containers():
            cw = f"{t.where} container {c.get('name')}"
            for m in c.get("volumeMounts") or []:
                self.check(m.get("name") in volumes, cw, f"volumeMount {m.get('name')!r} names no volume")
            self.check_container(t, c, cw)
            if is_app:
                self.check_hygiene(t, c, cw)
        if is_app:
            self.check_pod_hygiene(t)

    def is_nanoinfer_container(self, t, c):
        cmd = c.get("command") or []
        return (
            image_repo(c.get("image", "")) == image_repo(self.image)
            or (cmd and os.path.basename(cmd[0]).startswith("nanoinfer"))
            or t.labels.get("app.kubernetes.io/component") in ("coordinator", "worker")
        )

    def env_of(self, t, c, cw):
        """Ordered {name: value or None (not a literal)} and the ordered names."""
        env, order = {}, []
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                cm = self.configmaps.get((t.ns, ref.get("name")))
                if cm is None:
                    self.check(ref.get("optional"), cw, f"envFrom ConfigMap {ref.get('name')!r} is not in the render")
                    continue
                for k, v in (cm.get("data") or {}).items():
                    self.check(not VAR_REF.search(str(v)), cw,
                               f"envFrom ConfigMap {ref.get('name')} key {k}: $(...) is not expanded in envFrom values")
                    env[prefix + k] = str(v)
                    order.append(prefix + k)
            elif "secretRef" in src:
                self.note(f"{cw}: envFrom Secret {src['secretRef'].get('name')!r}: its keys cannot be checked")
        for e in c.get("env") or []:
            name = e.get("name")
            if "value" in e:
                value = str(e["value"])
                for ref in VAR_REF.findall(value):
                    self.check(ref in env, cw, f"env {name}: $({ref}) is not defined before it "
                               "(kubelet would pass the text literally)")
                env[name] = value
            else:
                env[name] = None
            order.append(name)
        for field in ("command", "args"):
            for arg in c.get(field) or []:
                for ref in VAR_REF.findall(str(arg)):
                    self.check(ref in env, cw, f"{field}: $({ref}) is not a variable of the container")
        return env, order

    def check_container(self, t, c, cw):
        env, _ = self.env_of(t, c, cw)
        if not self.is_nanoinfer_container(t, c):
            return
        self.check(c.get("image") == self.image, cw,
                   f"image {c.get('image')!r}, expected {self.image!r} (what scripts/build-image tags)")
        cmd = c.get("command") or []
        if not self.check(cmd, cw, "sets no command: name the binary (command[0]) rather than rely "
                          "on the image's entrypoint"):
            return
        binary = os.path.basename(cmd[0])
        nanoinfer_vars = [n for n in env if n.startswith("NANOINFER_")]
        if binary == "etcd":
            for n in nanoinfer_vars:
                self.check(False, cw, f"env {n}: etcd reads no NANOINFER_* variables")
            self.check_etcd(t, c, cw)
            return
        helptext = binary_help(self.bin_dir, binary) if binary in HELP_BINARIES else None
        if helptext is None:
            for n in nanoinfer_vars:
                self.check(False, cw, f"env {n}: cannot check it, {binary} is not one of "
                           f"{', '.join(HELP_BINARIES)} in BIN_DIR={self.bin_dir}")
            if binary in HELP_BINARIES:
                self.errors.append(f"{cw}: {self.bin_dir}/{binary} --help cannot be run (set BIN_DIR)")
            return
        for n in nanoinfer_vars:
            self.check(n in helptext, cw, f"env {n} is not read by {binary} (not in its --help)")

        def effective(name):
            return env[name] if env.get(name) is not None else helptext.get(name)

        # The listen addresses must be set on the container: the image's own
        # ENV (deploy/Dockerfile sets NANOINFER_LISTEN=0.0.0.0:50061 for every
        # binary) would otherwise win over --help's default.
        for var in ("NANOINFER_LISTEN", "NANOINFER_METRICS_LISTEN", "NANOINFER_HTTP_LISTEN"):
            if var in helptext and not c.get("_init"):
                self.check(env.get(var), cw, f"{var} is not set: set it explicitly (the image's ENV, "
                           "not --help's default, would apply)")
        ports = {}
        if "NANOINFER_LISTEN" in helptext:
            ports["grpc"] = port_of(effective("NANOINFER_LISTEN"))
        if "NANOINFER_METRICS_LISTEN" in helptext:
            ports["metrics"] = port_of(effective("NANOINFER_METRICS_LISTEN"))
        if "NANOINFER_HTTP_LISTEN" in helptext and effective("NANOINFER_HTTP_LISTEN") != "off":
            ports["http"] = port_of(effective("NANOINFER_HTTP_LISTEN"))
        for role, port in ports.items():
            self.check(port is not None, cw, f"cannot read the {role} port from its env or --help default")
        listened = {p for p in ports.values() if p}
        declared = {p.get("containerPort") for p in c.get("ports") or []}
        if not c.get("_init"):
            self.check(declared == listened, cw,
                       f"containerPorts {sorted(declared)} differ from the ports {binary} listens on "
                       f"{sorted(listened)} (NANOINFER_LISTEN / NANOINFER_METRICS_LISTEN / NANOINFER_HTTP_LISTEN)")
        if env.get("NANOINFER_ADVERTISE") and ports.get("grpc"):
            self.check(port_of(env["NANOINFER_ADVERTISE"]) == ports["grpc"], cw,
                       f"NANOINFER_ADVERTISE {env['NANOINFER_ADVERTISE']!r} is not on the listen port {ports['grpc']}")
        tls_var = TLS_SWITCH.get(binary)
        tls_on = bool(tls_var) and tls_var in env and env[tls_var] != ""
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(kind)
            if not probe:
                continue
            pw = f"{cw} {kind}"
            if "grpc" in probe:
                self.check(probe["grpc"].get("port") == ports.get("grpc"), pw,
                           f"gRPC probe on port {probe['grpc'].get('port')}, the gRPC listen port is {ports.get('grpc')}")
                self.check(not tls_on, pw, f"gRPC probe on a TLS port ({tls_var} is set): kubelet gRPC "
                           "probes are plaintext; use httpGet /readyz or /healthz on the metrics port")
            if "httpGet" in probe:
                port = resolve_port([c], probe["httpGet"].get("port"))
                self.check(port is not None and port == ports.get("metrics"), pw,
                           f"HTTP probe on port {probe['httpGet'].get('port')!r}, the metrics port is "
                           f"{ports.get('metrics')}")
            if "tcpSocket" in probe:
                port = resolve_port([c], probe["tcpSocket"].get("port"))
                self.check(port in listened, pw, f"tcpSocket probe on {probe['tcpSocket'].get('port')!r}, "
                           f"not a port {binary} listens on")
        if not c.get("_init") and "NANOINFER_GRACE_PERIOD" in helptext:
            grace = effective("NANOINFER_GRACE_PERIOD")
            try:
                grace = float(grace)
            except (TypeError, ValueError):
                self.check(False, cw, f"NANOINFER_GRACE_PERIOD {grace!r} is not a number")
                grace = None
            if grace is not None:
                tgps = t.spec.get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE)
                pre = prestop_seconds(c)
                self.check(tgps > grace + pre, cw,
                           f"terminationGracePeriodSeconds {tgps} is not above the drain: "
                           f"NANOINFER_GRACE_PERIOD {grace:g}" + (f" + preStop {pre:g}" if pre else ""))
        if "NANOINFER_THREADS" in env and env["NANOINFER_THREADS"] is not None:
            cpu = ((c.get("resources") or {}).get("limits") or {}).get("cpu")
            if self.check(cpu is not None, cw, "NANOINFER_THREADS is set but there is no CPU limit"):
                self.check(float(env["NANOINFER_THREADS"]) == quantity_to_cores(cpu), cw,
                           f"NANOINFER_THREADS {env['NANOINFER_THREADS']} differs from the CPU limit {cpu}")
        mounts = [m.get("mountPath", "").rstrip("/") + "/" for m in c.get("volumeMounts") or []]
        for n in nanoinfer_vars:
            v = env.get(n)
            if v and v.startswith("/"):
                self.check(any(v.startswith(m) for m in mounts), cw,
                           f"{n}={v} is not under any volumeMount (the root filesystem is the image's)")
        self.check_endpoints(t, c, cw, env)

    def check_endpoints(self, t, c, cw, env):
        urls = []
        if env.get("NANOINFER_ETCD_ENDPOINTS"):
            want = "https" if env.get("NANOINFER_ETCD_CA") else "http"
            for u in env["NANOINFER_ETCD_ENDPOINTS"].split(","):
                u = u.strip()
                urls.append(("NANOINFER_ETCD_ENDPOINTS", u))
                self.check(urlsplit(u).scheme == want, cw,
                           f"NANOINFER_ETCD_ENDPOINTS {u}: expected {want}:// "
                           f"({'with' if want == 'https' else 'without'} NANOINFER_ETCD_CA)")
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            urls.append(("OTEL_EXPORTER_OTLP_ENDPOINT", env["OTEL_EXPORTER_OTLP_ENDPOINT"]))
        for var, u in urls:
            parts = urlsplit(u)
            host = parts.hostname or ""
            try:
                port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
            except ValueError:
                port = None
            labels = host.split(".")
            if len(labels) == 1:
                name, ns = labels[0], t.ns
            elif len(labels) == 2 or labels[2:] in (["svc"], ["svc", "cluster", "local"]):
                name, ns = labels[0], labels[1]
            else:
                self.note(f"{cw}: {var} {u}: outside the cluster, not checked")
                continue
            if ns not in {self.ns(s) for s in self.services}:
                self.note(f"{cw}: {var} {u}: namespace {ns} is not in the render, not checked")
                continue
            svc = [s for s in self.services if s["metadata"]["name"] == name and self.ns(s) == ns]
            if not self.check(port is not None, cw, f"{var} {u}: cannot read a port from it"):
                continue
            if self.check(svc, cw, f"{var} {u}: no Service {name!r} in namespace {ns}"):
                self.check(any(p.get("port") == port for p in svc[0]["spec"].get("ports") or []), cw,
                           f"{var} {u}: Service {name} has no port {port}")

    def check_etcd(self, t, c, cw):
        listened = set()
        args = [str(a) for a in (c.get("command") or [])[1:] + (c.get("args") or [])]
        for i, a in enumerate(args):
            for flag in ETCD_LISTEN_FLAGS:
                value = None
                if a.startswith(flag + "="):
                    value = a.split("=", 1)[1]
                elif a == flag and i + 1 < len(args):
                    value = args[i + 1]
                if value:
                    for u in value.split(","):
                        try:
                            listened.add(urlsplit(u.strip()).port)
                        except ValueError:
                            self.check(False, cw, f"{flag}: cannot read a port from {u!r}")
        if not listened:
            self.note(f"{cw}: etcd without --listen-*-urls flags, ports not checked")
            return
        declared = {p.get("containerPort") for p in c.get("ports") or []}
        self.check(declared == listened, cw,
                   f"containerPorts {sorted(declared)} differ from etcd's --listen-*-urls ports {sorted(listened)}")
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(kind) or {}
            for how in ("httpGet", "tcpSocket", "grpc"):
                if how in probe:
                    port = resolve_port([c], probe[how].get("port"))
                    self.check(port in listened, f"{cw} {kind}",
                               f"probe port {probe[how].get('port')!r} is not a port etcd listens on")

    # -- hygiene ------------------------------------------------------------
    def check_pod_hygiene(self, t):
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/component"):
            self.check(label in t.labels, t.where, f"pod template has no {label} label")
        ann = t.meta.get("annotations") or {}
        if self.check(ann.get("prometheus.io/scrape") == "true", t.where,
                      "pod template has no prometheus.io/scrape: \"true\" annotation"):
            port = ann.get("prometheus.io/port")
            self.check(port and port.isdigit() and t.declares_port(int(port)), t.where,
                       f"prometheus.io/port {port!r} is not a containerPort")
            self.check(ann.get("prometheus.io/path"), t.where, "no prometheus.io/path annotation")

    def check_hygiene(self, t, c, cw):
        if t.kind in LONG_RUNNING_KINDS and not c.get("_init"):
            for probe in ("readinessProbe", "livenessProbe"):
                self.check(c.get(probe), cw, f"no {probe}")
        res = c.get("resources") or {}
        for section in ("requests", "limits"):
            for r in ("cpu", "memory"):
                self.check(r in (res.get(section) or {}), cw, f"no resources.{section}.{r}")
        pod_sc = t.spec.get("securityContext") or {}
        sc = c.get("securityContext") or {}

        def eff(key):
            return sc.get(key, pod_sc.get(key))

        self.check(eff("runAsNonRoot") is True, cw, "securityContext.runAsNonRoot is not true")
        self.check(eff("runAsUser") == APP_UID, cw, f"securityContext.runAsUser is not {APP_UID}")
        self.check(sc.get("readOnlyRootFilesystem") is True, cw, "securityContext.readOnlyRootFilesystem is not true")
        self.check(sc.get("allowPrivilegeEscalation") is False, cw,
                   "securityContext.allowPrivilegeEscalation is not false")
        self.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), cw,
                   "securityContext.capabilities.drop lacks ALL")
        self.check((eff("seccompProfile") or {}).get("type") == "RuntimeDefault", cw,
                   "seccompProfile is not RuntimeDefault")


def prestop_seconds(c):
    pre = ((c.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in pre:
        return float(pre["sleep"].get("seconds", 0))
    cmd = (pre.get("exec") or {}).get("command") or []
    if len(cmd) >= 2 and os.path.basename(str(cmd[0])) == "sleep":
        try:
            return float(cmd[1])
        except ValueError:
            return 0.0
    return 0.0


def check_documents(docs, bin_dir=None, image=None, source="<input>"):
    """Violations (a list of strings) in already-parsed manifests."""
    checker = Checker(docs, bin_dir or os.environ.get("BIN_DIR") or DEFAULT_BIN_DIR, image, source)
    checker.run()
    return checker.errors


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) >= 2 else 2
    try:
        import yaml
    except ImportError:
        print("check_wiring: PyYAML is missing: pip install pyyaml (deploy/k8s/validate does)", file=sys.stderr)
        return 2
    bin_dir = os.environ.get("BIN_DIR") or DEFAULT_BIN_DIR
    missing = [b for b in HELP_BINARIES if binary_help(bin_dir, b) is None]
    if missing:
        print(f"check_wiring: cannot run --help of {', '.join(missing)} in BIN_DIR={bin_dir}", file=sys.stderr)
        return 2
    image = expected_image()
    rc = 0
    for path in argv[1:]:
        try:
            with open(path) as f:
                docs = list(yaml.safe_load_all(f))
        except (OSError, yaml.YAMLError) as e:
            print(f"check_wiring: {path}: {e}", file=sys.stderr)
            return 2
        checker = Checker(docs, bin_dir, image, path)
        errors = checker.run()
        for n in checker.notes:
            print(f"check_wiring: note: {path}: {n}")
        if errors:
            rc = 1
            for e in errors:
                print(f"check_wiring: FAIL {path}: {e}")
            print(f"check_wiring: {path}: {len(errors)} violation(s) in {checker.checks} checks")
        else:
            print(f"check_wiring: {path}: ok, {checker.checks} checks over {len(checker.docs)} objects "
                  f"and {len(checker.templates)} pod templates (image {image})")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
