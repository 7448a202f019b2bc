"""Counts typed by a user (workload options, --seed, --vcpus, --host-cpus, -j, --samples, --grid)
and sizes take plain ASCII decimal digits: not the other spellings int() also takes (5_000, +5,
0x10 / 0b11 / 0o7 with base 0, other scripts' digits). docs/workloads.md, "Caps on counts"."""

import pytest

from pkvm import experiments as E
from pkvm._units import parse_decimal, parse_size
from pkvm.cli import main
from pkvm.experiments.workloads import get, parse_options

#: Spellings int() (or int(text, 0)) took for 3, 5000, 16...; none is a plain decimal.
NOT_DECIMAL = ["5_000", "0b11", "0x10", "0o7", "+5", "\u0663", "\uff15", "\u00b2", "1e3", "5.0", "", " ", "-1",
               "5 000", "\u0665\u0660"]


@pytest.mark.parametrize("text, value", [("5000", 5000), ("0", 0), ("007", 7), (" 12 ", 12), ("\t3\n", 3)])
def test_parse_decimal_accepts_ascii_digits(text, value):
    assert parse_decimal(text) == value


@pytest.mark.parametrize("text", NOT_DECIMAL)
def test_parse_decimal_refuses_everything_else(text):
    with pytest.raises(ValueError, match="digits 0-9 only"):
        parse_decimal(text)


@pytest.mark.parametrize("text", NOT_DECIMAL)
def test_workload_count_options_refuse_them(text):
    with pytest.raises(ValueError, match=r"option ops=.*expected a non-negative integer such as 5000 "
                                         r"\(decimal digits 0-9 only\)"):
        parse_options(get("swiotlb"), {"ops": text})
    with pytest.raises(ValueError, match="option ops="):
        E.Config(workload="swiotlb", options={"ops": text})


def test_workload_count_options_accept_decimal_text_and_ints():
    assert parse_options(get("swiotlb"), {"ops": "5000"})["ops"] == 5000
    assert parse_options(get("swiotlb"), {"ops": " 5000 "})["ops"] == 5000
    assert parse_options(get("swiotlb"), {"ops": 5000})["ops"] == 5000
    assert parse_options(get("virtio"), {"cycles": "2", "devices": "1"})["devices"] == 1


@pytest.mark.parametrize("text", ["\u0663G", "\uff16\uff14M", "6\u06644M", "64M\u2003"])
def test_sizes_refuse_other_scripts_digits(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize("text, value", [("64G", 64 << 30), (" 2 MiB ", 2 << 20), ("4096", 4096), ("1t", 1 << 40)])
def test_sizes_keep_their_forms(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("argv, message", [
    (["run", "--memory", "64M", "--workload", "swiotlb", "-o", "ops=5_000"],
     "option ops='5_000': expected a non-negative integer such as 5000 (decimal digits 0-9 only)"),
    (["run", "--memory", "64M", "--workload", "swiotlb", "-o", "ops=0b11"], "option ops='0b11'"),
    (["run", "--memory", "64M", "--workload", "swiotlb", "-o", "ops=\u0663"], "option ops='\u0663'"),
    (["run", "--memory", "64M", "--seed", "0x10"], "argument --seed: '0x10' is not a non-negative integer in "
                                                   "decimal digits"),
    (["run", "--memory", "64M", "--seed", "1_0"], "argument --seed: '1_0'"),
    (["run", "--memory", "64M", "--vcpus", "\u0662"], "argument --vcpus: '\u0662' is not a positive integer"),
    (["run", "--memory", "64M", "--vcpus", "+2"], "argument --vcpus: '+2' is not a positive integer"),
    (["run", "--memory", "64M", "--host-cpus", "1_6"], "argument --host-cpus: '1_6'"),
    (["run", "--memory", "\u0666\u0664M"], "argument --memory: '\u0666\u0664M' is not a size"),
    (["sweep", "--memory", "64M", "--grid", "vcpus=1,0b10"], "--grid vcpus=1,0b10: '0b10' is not an integer in "
                                                             "decimal digits"),
])
def test_cli_refuses_them_in_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1
