"""Dependencies point down (DESIGN.md "Layers"): a layer's sources and public headers include only
its own headers and those of the layers its CMake target links (transitively). The links in
CMakeLists.txt are the one statement of the layering; the include roots follow them (Note [Layer
include roots]: an upward include does not compile) and this test holds every #include to them too,
naming the file and line without a build. Kernels include no
Zeal layer and no torch header (DESIGN.md "Kernels are leaves")."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["core", "comm", "optim", "offload", "parallel", "zero", "checkpoint", "engine"]


def _links():
    """{layer: layers its target links directly}, from CMakeLists.txt."""
    text = (ROOT / "CMakeLists.txt").read_text()
    links = {layer: set() for layer in LAYERS}
    for target, body in re.findall(r"target_link_libraries\(zeal_(\w+)\s+([^)]*)\)", text):
        if target in links:
            links[target] |= {m for m in re.findall(r"\bzeal_(\w+)", body) if m in LAYERS or m == "kernels"}
    return links


def _below(links):
    """{layer: every layer it may include}: itself and the transitive closure of its links."""
    out = {}
    for layer in LAYERS:
        seen, todo = {layer}, [layer]
        while todo:
            for dep in links.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        out[layer] = seen
    return out


def _includes(path):
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r'\s*#\s*include\s*[<"]([^">]+)[">]', line)
        if m:
            yield line_no, m.group(1)


def _layer_of_include(name):
    parts = name.split("/")
    if parts[0] == "zeal" and len(parts) > 2:
        return parts[1]
    if parts[0] in ("cpu", "cuda"):
        return "kernels"
    return None


def test_every_include_points_down():
    allowed = _below(_links())
    assert allowed["engine"] >= {"zero", "parallel", "checkpoint", "optim", "comm", "core"}  # the parse worked
    bad = []
    for layer in LAYERS:
        files = list((ROOT / "src" / layer).glob("*.[ch]*")) + list((ROOT / "include" / "zeal" / layer).glob("*.h"))
        if not files:
            bad.append(f"layer {layer} has no files (renamed?)")
        for path in files:
            for line_no, name in _includes(path):
                dep = _layer_of_include(name)
                if dep is not None and dep not in allowed[layer]:
                    bad.append(f"{path.relative_to(ROOT)}:{line_no} includes {name} ({dep}), but zeal_{layer} "
                               f"links only {sorted(allowed[layer] - {layer})}")
    assert not bad, "\n".join(bad)


def test_kernels_are_leaves():
    bad = []
    for path in list((ROOT / "kernels").rglob("*.cpp")) + list((ROOT / "kernels").rglob("*.cu")) + \
            list((ROOT / "kernels").rglob("*.h")) + list((ROOT / "kernels").rglob("*.cuh")):
        for line_no, name in _includes(path):
            if name.startswith(("zeal/", "torch/", "ATen/", "c10/")):
                bad.append(f"{path.relative_to(ROOT)}:{line_no} includes {name}")
    assert not bad, "\n".join(bad)


def test_the_check_itself_catches_an_upward_include(tmp_path):
    # A wrong implementation of the rule (say, one that allowed everything) would pass the tests above.
    allowed = _below(_links())
    assert "engine" not in allowed["zero"] and "zero" not in allowed["comm"] and "parallel" not in allowed["core"]
    assert _layer_of_include("zeal/engine/engine.h") == "engine" and _layer_of_include("cpu/half_reduce.h") == "kernels"
