"""Which malloc runs, and when the console command re-executes itself under tcmalloc."""

from estimator.allocator import ENV, active_allocator, find_library, preload_env

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_active_allocator_reads_the_mapped_libraries():
    glibc = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    assert active_allocator(glibc) == "system"
    assert active_allocator(glibc + f"7f20-7f30 r-xp 0 08:01 2 {TCMALLOC}\n") == "tcmalloc"
    assert active_allocator(glibc + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/libjemalloc.so.2\n") \
        == "jemalloc"
    assert active_allocator() in ("system", "tcmalloc", "jemalloc")  # this process


def test_find_library_takes_the_first_installed(tmp_path):
    assert find_library("tcmalloc", dirs=(str(tmp_path),)) is None
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert find_library("tcmalloc", dirs=(str(tmp_path),)) == str(tmp_path / "libtcmalloc.so.4")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_library("tcmalloc", dirs=(str(tmp_path),)) \
        == str(tmp_path / "libtcmalloc_minimal.so.4")


def test_preload_env_only_where_it_applies():
    env = {"PATH": "/bin"}
    assert preload_env(env, TCMALLOC) == {"PATH": "/bin", "LD_PRELOAD": TCMALLOC, ENV: "tcmalloc"}
    assert preload_env({**env, "LD_PRELOAD": "/x/libfoo.so"}, TCMALLOC)["LD_PRELOAD"] \
        == f"{TCMALLOC}:/x/libfoo.so"
    assert preload_env(env, None) is None  # not installed
    assert preload_env(env, TCMALLOC, platform="darwin") is None
    assert preload_env({**env, ENV: "system"}, TCMALLOC) is None  # the user's choice
    assert preload_env({**env, ENV: "tcmalloc"}, TCMALLOC) is None  # already re-executed
    assert preload_env({**env, "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, TCMALLOC) is None
