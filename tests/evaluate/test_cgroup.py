"""Sandbox cgroups: where they can be made is read correctly from the kernel's tables (v1, v2, hybrid,
namespaced, odd paths), and where this machine lets us make one, it limits what it says, holds the process
started through it, and leaves nothing behind."""

import subprocess
import sys

import pytest

from snugtune.evaluate.cgroup import Hierarchy, entry_command, find_hierarchies, limits_reached, make_cgroup, \
    remove_cgroup, usable_hierarchies
from snugtune.evaluate.confine import mount_table

CGROUPS, CGROUP_PROBLEM = usable_hierarchies()
needs_cgroups = pytest.mark.skipif(not CGROUPS, reason=f"no cgroup can be made here: {CGROUP_PROBLEM}")

V1_HYBRID = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime master:3 shared:9 - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_OWN = "9:name=systemd:/\n8:pids:/\n4:memory:/jobs/a1\n1:cpu,cpuacct:/\n0::/\n"

# cgroup -> (mountinfo, /proc/self/cgroup, expected (version, parent, controllers) rows)
TABLES = {
    "v1 beside an empty v2 mount": (V1_HYBRID, V1_OWN, [
        (1, "/sys/fs/cgroup/memory/jobs/a1", ("memory",)), (1, "/sys/fs/cgroup/pids", ("pids",))]),
    "v1 seen from a container (mount root is the container's cgroup)": (
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n",
        "4:memory:/docker/abc\n", [(1, "/sys/fs/cgroup/memory", ("memory",))]),
    "v1 mount that does not show this process's cgroup": (
        "35 31 0:32 /other /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "4:memory:/docker/abc\n", []),
    "v1 mount root that is only a name prefix": (
        "35 31 0:32 /doc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "4:memory:/docker/abc\n", []),
    "no cgroup mounts at all": ("27 1 254:0 / / rw - ext4 /dev/vda rw\n", "0::/\n", []),
    "a mount point with a space": (
        "35 31 0:32 / /sys/fs/cgroup/my\\040memory rw - cgroup cgroup rw,memory\n", "4:memory:/a\n",
        [(1, "/sys/fs/cgroup/my memory/a", ("memory",))]),
}


@pytest.mark.parametrize("case", list(TABLES))
def test_where_cgroups_can_be_made_is_read_from_the_kernel_tables(case):
    mountinfo, own, expected = TABLES[case]
    found = find_hierarchies(mountinfo, own)
    assert [(h.version, str(h.parent), h.controllers) for h in found] == expected


@pytest.mark.parametrize("enabled, own, expected", [
    ("memory pids", "/a/job", ("a/job", ("memory", "pids"))),    # this process's own folder delegates both
    ("", "/a/job", ("a", ("memory", "pids"))),                   # else its parent, whose subtree has them
    ("cpu io", "/a/job", None),                                  # neither offers memory or pids
])
def test_v2_uses_a_folder_whose_subtree_already_enables_the_controllers(tmp_path, enabled, own, expected):
    (tmp_path / "a" / "job").mkdir(parents=True)
    (tmp_path / "a" / "job" / "cgroup.subtree_control").write_text(enabled)
    (tmp_path / "a" / "cgroup.subtree_control").write_text("memory pids" if enabled == "" else "cpu")
    mountinfo = f"41 31 0:38 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw\n"
    found = find_hierarchies(mountinfo, f"0::{own}\n")
    if expected is None:
        assert found == []
    else:
        assert found == [Hierarchy(2, tmp_path / expected[0], expected[1])]


def test_mountinfo_rows_with_optional_fields_and_escapes():
    rows = mount_table("36 35 98:0 /mnt\\0401 /mnt/two\\011tabs rw,noatime master:1 shared:2 - ext3 /dev/root "
                       "rw,errors=x\n")
    assert rows[0].root == "/mnt 1" and rows[0].point == "/mnt/two\ttabs"
    assert rows[0].options == ["rw", "noatime"] and rows[0].fstype == "ext3" and rows[0].super_options[0] == "rw"


@needs_cgroups
def test_a_process_started_through_the_cgroup_is_in_it_and_the_folders_go_away():
    cgroup = make_cgroup(CGROUPS, 256 << 20, 16)
    try:
        own = subprocess.run([*entry_command(cgroup), "cat", "/proc/self/cgroup"], capture_output=True, text=True,
                             check=True).stdout
        name = cgroup.folders[0].name
        assert own.count(name) == len(cgroup.folders)
        for hierarchy, folder in zip(cgroup.hierarchies, cgroup.folders):
            if "pids" in hierarchy.controllers:
                assert (folder / "pids.max").read_text().strip() == "16"
    finally:
        remove_cgroup(cgroup)
    assert not any(folder.exists() for folder in cgroup.folders)


@needs_cgroups
def test_a_limit_that_stops_a_process_is_reported():
    memory = [h for h in CGROUPS if "memory" in h.controllers]
    if not memory:
        pytest.skip("no memory controller here")
    cgroup = make_cgroup(tuple(memory), 64 << 20, 16)
    try:
        hog = "x = bytearray(256 << 20)\nfor i in range(0, len(x), 4096):\n    x[i] = 1\n"
        done = subprocess.run([*entry_command(cgroup), sys.executable, "-c", hog], capture_output=True)
        assert done.returncode != 0 and limits_reached(cgroup) == ["memory"]
    finally:
        remove_cgroup(cgroup)


@needs_cgroups
def test_a_limit_the_kernel_refuses_leaves_no_folder_behind():
    pids = next((h for h in CGROUPS if "pids" in h.controllers), None)
    if pids is None:
        pytest.skip("no pids controller here")
    before = set(pids.parent.glob("snugtune-sandbox-*"))
    with pytest.raises(OSError):
        make_cgroup((pids,), 1 << 30, "not a number")
    assert set(pids.parent.glob("snugtune-sandbox-*")) == before
