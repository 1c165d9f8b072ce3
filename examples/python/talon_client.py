#!/usr/bin/env python3
"""A Talon API client on the stock Python gRPC stack (grpcio), and a walk-through of an analyst's
script: find clients, collect an artifact and read its rows, run a hunt and wait for it, stream its
results, download a file a flow uploaded and check its SHA-256.

It reads the API config that `talon config api-client` writes, the way pyvelociraptor reads
Velociraptor's: `ca_certificate`, `client_cert`, `client_private_key` (PEM) and
`api_connection_string` (HOST:PORT of the master's API). The gRPC stubs are generated from Talon's
`proto/` directory with grpcio-tools when the module loads, so the only install is
`pip install -r requirements.txt`.

    python talon_client.py --api-config api.config.yaml [--upload-glob '/etc/hostname']

Use it as a library too:

    from talon_client import Talon
    t = Talon.from_config("api.config.yaml")
    for c in t.search("host:web"):
        print(c.client_id, c.hostname)

docs/api.md lists every call and its errors.
"""

import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile

import grpc
import yaml
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO_DIR = os.path.join(HERE, "..", "..", "proto", "proto")


def load_stubs(proto_dir=DEFAULT_PROTO_DIR):
    """Generates the Python modules for Talon's protos into a scratch directory and imports them:
    returns (api_pb2, api_pb2_grpc, comms_pb2)."""
    out = tempfile.mkdtemp(prefix="talon-stubs-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, "comms.proto"),
        os.path.join(proto_dir, "api.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"cannot generate the gRPC stubs from {proto_dir}")
    sys.path.insert(0, out)
    return (
        importlib.import_module("api_pb2"),
        importlib.import_module("api_pb2_grpc"),
        importlib.import_module("comms_pb2"),
    )


api_pb2, api_pb2_grpc, comms_pb2 = load_stubs(os.environ.get("TALON_PROTO_DIR", DEFAULT_PROTO_DIR))

# Pages of results can be large; the server sends up to its own limit.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]


class Talon:
    """The master's API over one mutual-TLS channel."""

    def __init__(self, target, ca_pem, cert_pem, key_pem):
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_pem.encode(),
            private_key=key_pem.encode(),
            certificate_chain=cert_pem.encode(),
        )
        self.channel = grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)
        self.stub = api_pb2_grpc.ApiStub(self.channel)

    @classmethod
    def from_config(cls, path):
        with open(path) as f:
            c = yaml.safe_load(f)
        return cls(
            c["api_connection_string"],
            c["ca_certificate"],
            c["client_cert"],
            c["client_private_key"],
        )

    def search(self, query="all"):
        """Every client matching `query` (all, host:X, label:X, ip:X, an id prefix, or a bare
        host-name prefix), a page at a time."""
        offset = 0
        while True:
            r = self.stub.SearchClients(
                api_pb2.SearchRequest(query=query, offset=offset, limit=1000)
            )
            yield from r.clients
            offset += len(r.clients)
            if not r.truncated:
                return

    def collect(self, client_id, artifact, **params):
        return self.stub.Collect(
            api_pb2.CollectRequest(
                client_id=client_id,
                artifact=artifact,
                params={k: str(v) for k, v in params.items()},
            )
        )

    def wait_flow(self, client_id, flow_id):
        """The flow as it finished (the server streams each change; no polling)."""
        last = None
        for f in self.stub.WatchFlow(api_pb2.FlowRequest(client_id=client_id, flow_id=flow_id)):
            last = f
        return last

    def flow_rows(self, client_id, flow_id):
        for page in self.stub.GetFlowResults(
            api_pb2.FlowRequest(client_id=client_id, flow_id=flow_id)
        ):
            for row in page.rows:
                yield json.loads(row)

    def create_hunt(self, artifact, client_limit=0, description="", **params):
        return self.stub.CreateHunt(
            api_pb2.CreateHuntRequest(
                artifact=artifact,
                params={k: str(v) for k, v in params.items()},
                client_limit=client_limit,
                description=description,
            )
        )

    def wait_hunt(self, hunt_id, progress=None):
        """The hunt once it is no longer running and every participant has reported."""
        last = None
        for h in self.stub.WatchHunt(api_pb2.HuntRequest(hunt_id=hunt_id)):
            if progress:
                progress(h)
            last = h
        return last

    def hunt_rows(self, hunt_id):
        """Every row of the hunt, with the client and flow it came from."""
        for page in self.stub.GetHuntResults(api_pb2.HuntRequest(hunt_id=hunt_id)):
            for row in page.rows:
                yield page.client_id, page.flow_id, json.loads(row)

    def uploads(self, client_id, flow_id):
        return self.stub.ListUploads(
            api_pb2.FlowRequest(client_id=client_id, flow_id=flow_id)
        ).uploads

    def download(self, client_id, flow_id, upload, out_path):
        """Writes an upload to `out_path`; returns its SHA-256 as computed here, after checking it
        against the one the server recorded."""
        sha = hashlib.sha256()
        with open(out_path, "wb") as out:
            req = api_pb2.DownloadRequest(
                client_id=client_id, flow_id=flow_id, upload_id=upload.upload_id
            )
            for chunk in self.stub.DownloadUpload(req):
                out.write(chunk.data)
                sha.update(chunk.data)
        got = sha.hexdigest()
        if got != upload.sha256:
            raise RuntimeError(f"{upload.name}: SHA-256 {got}, the server recorded {upload.sha256}")
        return got


def walk_through(t, upload_glob, download_to):
    summary = {}
    clients = [c for c in t.search("all") if c.connected]
    if not clients:
        raise RuntimeError("no connected client to work with")
    summary["clients"] = len(clients)
    first = clients[0]
    print(f"{len(clients)} connected clients; collecting from {first.client_id} ({first.hostname})",
          file=sys.stderr)

    f = t.collect(first.client_id, "Generic.Client.Info")
    f = t.wait_flow(first.client_id, f.flow_id)
    rows = list(t.flow_rows(first.client_id, f.flow_id))
    summary["collect"] = {"state": comms_pb2.FlowState.Name(f.state), "rows": len(rows),
                          "hostname": rows[0].get("hostname") if rows else None}

    h = t.create_hunt("Generic.Client.Info", client_limit=len(clients),
                      description="python example")
    print(f"hunt {h.hunt_id} created", file=sys.stderr)
    h = t.wait_hunt(h.hunt_id, lambda h: print(
        f"  {api_pb2.HuntState.Name(h.state)} scheduled={h.stats.scheduled} "
        f"completed={h.stats.completed}", file=sys.stderr))
    hunt_rows = list(t.hunt_rows(h.hunt_id))
    summary["hunt"] = {"id": h.hunt_id, "state": api_pb2.HuntState.Name(h.state),
                       "completed": h.stats.completed, "rows": len(hunt_rows),
                       "clients": sorted({c for c, _, _ in hunt_rows})}

    if upload_glob:
        f = t.collect(first.client_id, "Generic.Forensic.FileFinder", glob=upload_glob,
                      upload="true")
        f = t.wait_flow(first.client_id, f.flow_id)
        ups = t.uploads(first.client_id, f.flow_id)
        if not ups:
            raise RuntimeError(f"flow {f.flow_id} uploaded nothing for {upload_glob!r}")
        out = download_to or os.path.join(tempfile.mkdtemp(), "upload")
        sha = t.download(first.client_id, f.flow_id, ups[0], out)
        summary["download"] = {"name": ups[0].name, "size": os.path.getsize(out),
                               "sha256": sha, "path": out}
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api-config", required=True, help="the API config (talon config api-client)")
    p.add_argument("--upload-glob", help="a file on the first client to collect and download")
    p.add_argument("--download-to", help="where to write the downloaded file")
    a = p.parse_args()
    try:
        t = Talon.from_config(a.api_config)
        print(json.dumps(walk_through(t, a.upload_glob, a.download_to), indent=2))
    except grpc.RpcError as e:
        print(f"talon API error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, KeyError, RuntimeError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
