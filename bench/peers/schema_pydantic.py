"""pydantic peer of the `schema` scenario (Debian 12 ships pydantic 1.10:
pydantic v2 is not packaged). Prints "bench: <what> rate=<per second>"."""
import json
import os
import time
from typing import List, Literal, Optional

from pydantic import BaseModel, conint, confloat, constr

N = int(os.environ.get("BENCH_N", "200000"))


class Address(BaseModel):
    street: str
    city: str
    zip: constr(regex=r"^\d+$")


class Order(BaseModel):
    id: int
    user: str
    amount: confloat(ge=0)
    currency: Literal["EUR", "USD"]
    paid: bool
    tags: List[str]
    note: Optional[str] = None
    qty: conint(ge=1)
    sku: constr(min_length=3)
    address: Address


msg = {"id": 1, "user": "ann", "amount": 12.5, "currency": "EUR", "paid": True, "tags": ["a", "b"],
       "qty": 2, "sku": "ABC-1", "address": {"street": "Main 1", "city": "X", "zip": "12345"}}


def measure(what, fn):
    t0 = time.monotonic()
    for _ in range(N):
        fn()
    secs = time.monotonic() - t0
    print("bench: %s rate=%.0f ns_per_msg=%.0f" % (what, N / secs, secs / N * 1e9), flush=True)


measure("validate", lambda: Order.parse_obj(msg))
raw = json.dumps(msg)
measure("json", lambda: json.dumps(json.loads(raw)))
