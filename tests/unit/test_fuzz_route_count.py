"""docs/security.md "Fuzzing" says how many routes the HTTP fuzzer covers; it is the route table.

tests/component/test_fuzz_http.py makes one fuzz test per entry of api/server/routes.py ROUTES,
so a route added or removed changes the number the document must give.
"""

from __future__ import annotations

import re
from pathlib import Path

from api.server.routes import ROUTES

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
FUZZ_ROW = re.compile(r"^\| `tests/component/test_fuzz_http\.py` \|.*\((\d+) routes\)", re.MULTILINE)


def test_the_documented_route_count_is_the_fuzzed_route_table() -> None:
    rows = FUZZ_ROW.findall(SECURITY_DOC.read_text(encoding="utf-8"))
    assert len(rows) == 1, "docs/security.md's fuzzing table has no single test_fuzz_http.py row"
    assert int(rows[0]) == len(ROUTES)
