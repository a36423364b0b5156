#!/usr/bin/env python3
"""Generates throwaway API keys for the load benchmark, in keygate's format (sk_ + 40 base62 +
6 base62 of CRC32), and writes the four views of them the benchmark needs:

  OUT.export.json  a keygate export (SHA-256 digests only) for `keygate keys import`
  OUT.nginx.map    the same keys as an nginx `map` body (key -> id), for the nginx peer
  OUT.haproxy.map  the same keys as an HAProxy map file ("key id" lines), for the HAProxy peer
  OUT.keys         the keys, one per line, for the load clients (wrk's keys.lua, h2load, curl,
                   handshakes.py)

The keys live in the benchmark's temporary directory and are deleted with it.
"""
import hashlib
import json
import secrets
import sys
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def checksum(text: str) -> str:
    crc = zlib.crc32(text.encode()) & 0xFFFFFFFF
    out = []
    for _ in range(6):
        out.append(BASE62[crc % 62])
        crc //= 62
    return "".join(reversed(out))


def mint() -> str:
    body = "sk_" + "".join(secrets.choice(BASE62) for _ in range(40))
    return body + checksum(body)


def main() -> None:
    count, out = int(sys.argv[1]), sys.argv[2]
    keys = [mint() for _ in range(count)]
    records = [
        {
            "id": f"key_bench{i:07d}",
            "name": f"bench-{i}",
            "digest": hashlib.sha256(k.encode()).hexdigest(),
            "hint": k[:7] + "…",
            "created_at": 1767225600,
            "last_used": None,
            "use_count": 0,
            "is_active": True,
            "legacy": False,
            "expires_at": None,
        }
        for i, k in enumerate(keys)
    ]
    export = {"format": "keygate-export", "version": 1, "exported_at": "2026-01-01T00:00:00Z", "keys": records}
    with open(out + ".export.json", "w") as f:
        json.dump(export, f)
    with open(out + ".nginx.map", "w") as f:
        f.writelines(f'    "{k}" "key_bench{i:07d}";\n' for i, k in enumerate(keys))
    with open(out + ".haproxy.map", "w") as f:
        f.writelines(f"{k} key_bench{i:07d}\n" for i, k in enumerate(keys))
    with open(out + ".keys", "w") as f:
        f.writelines(k + "\n" for k in keys)


if __name__ == "__main__":
    main()
