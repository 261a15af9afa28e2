"""docs/compatibility.md's API tables say, name by name, what Zeal supports of DeepSpeed's engine
API: every name marked supported must exist on Zeal's engine (and every name marked "not yet"
must not, so the table is kept up to date)."""
import re

from conftest import ROOT

import zeal
from zeal.engine import ZealEngine
from zeal.pipe import PipelineEngine

# Set in __init__ rather than on the class.
INSTANCE = {"ZealEngine": {"module", "optimizer", "lr_scheduler", "training_dataloader", "config", "__call__", "mpu",
                           "monitor", "flops_profiler"},
            "PipelineEngine": {"module", "optimizer", "lr_scheduler", "training_dataloader", "config", "grid", "mpu",
                               "num_stages", "stage_id", "micro_batches", "micro_batch_size", "data_iterator"}}


def rows(title_word):
    text = (ROOT / "docs" / "compatibility.md").read_text()
    start = text.index(f"### {title_word}")
    end = text.find("\n#", start + 4)  # the next heading of any level
    section = text[start:end if end > 0 else len(text)]
    header = re.search(r": (\d+) of (\d+) supported", section)
    found = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|$", section, flags=re.M)
    return found, int(header.group(1)), int(header.group(2))


def check(title_word, cls):
    found, yes, total = rows(title_word)
    assert len(found) == total and sum(1 for _, s in found if s.startswith("yes")) == yes
    instance = INSTANCE[cls.__name__]
    for name, status in found:
        present = name in instance or hasattr(cls, name)
        assert present == status.startswith("yes"), f"{cls.__name__}.{name}: the table says {status!r}"


def test_engine_table_matches_the_code():
    check("DeepSpeedEngine", ZealEngine)


def test_pipeline_table_matches_the_code():
    check("PipelineEngine", PipelineEngine)


def test_module_level_table_matches_the_code():
    found, yes, total = rows("Module level")
    assert len(found) == total
    for name, status in found:
        obj = zeal
        present = True
        for part in name.split("."):
            call = part.endswith("()")  # get_accelerator().device_name: a method of what it returns
            part = part[:-2] if call else part
            if not hasattr(obj, part):
                present = False
                break
            obj = getattr(obj, part)() if call else getattr(obj, part)
        assert present == status.startswith("yes"), f"zeal.{name}: the table says {status!r}"
