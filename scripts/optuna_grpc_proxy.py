"""Optuna's gRPC storage proxy in front of the study's database, for more sweep workers than the
database takes connections: `python scripts/optuna_grpc_proxy.py --storage postgresql://... --port 13000`;
the workers then run `python pipeline/sweep.py --storage grpc://<this host>:13000`.

The proxy holds the only database connections, so heartbeats (and failing a dead worker's trials)
are not available through it: Optuna's GrpcStorageProxy does not support them.
"""

import argparse

import optuna
from optuna.storages import get_storage, run_grpc_proxy_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the RDB URL the proxy serves")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=13000)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.INFO)  # the "server started" line
    # get_storage, not RDBStorage: it adds the in-process cache the proxy's docs ask for.
    run_grpc_proxy_server(get_storage(args.storage), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
