"""What a cell reads and binds, found from its source alone."""

from __future__ import annotations

from flash_jupyter.jupyter.cellcode import analyse, undefined


def test_bound_names_in_order_top_level_only():
    a = analyse(
        "import numpy as np, os.path\n"
        "from math import sqrt as root\n"
        "x, (y, *rest) = 1, (2, 3)\n"
        "def f(arg):\n    inner = arg\n    return inner\n"
        "class K:\n    attr = 1\n"
        "for i in range(3):\n    total = i\n"
        "with open('f') as fh:\n    pass\n"
        "try:\n    pass\nexcept ValueError as err:\n    pass\n"
        "if (n := 5):\n    pass\n"
        "obj.attr = 1\nitems[0] = 2\n"
    )
    assert a.bound == ["np", "os", "root", "x", "y", "rest", "f", "K", "i", "total", "fh",
                       "err", "n"]  # fmt: skip
    assert "inner" not in a.bound and "attr" not in a.bound and "arg" not in a.bound


def test_what_must_come_from_the_notebook():
    a = analyse("h = make()\nh.update()\nx += 1\nif c:\n    y = 1\nprint(y)\nz = 1\nf = lambda: z")
    # h and z are bound before anything reads them: the notebook's values are not needed.
    assert a.bound_first == {"h", "z", "f"}
    needed = a.loaded - a.bound_first
    assert {"x", "y", "c", "make"} <= needed  # x += 1 reads x; y may stay unbound


def test_undefined_names_and_where_they_are_first_used():
    a = analyse("import math\nv = math.pi\nw = v + missing\nlambda q: q + also_missing\n")
    assert undefined(a, {"unrelated": 1}) == ["also_missing", "missing"]
    assert a.first_use["missing"] == 3
    assert undefined(a, {"missing": 1, "also_missing": 2}) == []
    assert undefined(analyse("print(len([]))"), {}) == []  # builtins are always there
