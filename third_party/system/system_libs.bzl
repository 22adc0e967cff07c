"""Repository rule exposing Debian's system libraries (found with pkg-config) to Bazel.

Each group becomes one cc_library carrying only copts/linkopts: the headers live in /usr/include,
which the auto-configured gcc toolchain already searches.
"""

_GROUPS = {
    "grpc": ["grpc++", "grpc"],
    "protobuf": ["protobuf"],
    "absl": [
        "absl_status",
        "absl_statusor",
        "absl_strings",
        "absl_str_format",
        "absl_synchronization",
        "absl_time",
        "absl_flat_hash_map",
        "absl_flat_hash_set",
        "absl_span",
        "absl_cleanup",
    ],
    "uring": ["liburing"],
    "zstd": ["libzstd"],
    "lz4": ["liblz4"],
    "gtest": ["gtest", "gmock"],
    "gtest_main": ["gtest", "gmock", "gtest_main"],
}

# Libraries without a .pc file.
_EXTRA_LINKOPTS = {
    "grpc": ["-lgrpc++_reflection"],
}

def _pkg_config(ctx, args):
    res = ctx.execute(["pkg-config"] + args)
    if res.return_code != 0:
        fail("pkg-config %s failed (run tools/setup.sh): %s" % (" ".join(args), res.stderr))
    return [f for f in res.stdout.strip().split(" ") if f]

def _system_libs_impl(ctx):
    build = ['package(default_visibility = ["//visibility:public"])', ""]
    for name, pkgs in _GROUPS.items():
        cflags = _pkg_config(ctx, ["--cflags"] + pkgs)
        libs = _pkg_config(ctx, ["--libs"] + pkgs) + _EXTRA_LINKOPTS.get(name, [])
        copts = [f for f in cflags if not f.startswith("-I/usr/include")]
        build.append("cc_library(")
        build.append('    name = "%s",' % name)
        build.append("    copts = %s," % repr(copts))
        build.append("    linkopts = %s," % repr(libs))
        build.append(")")
        build.append("")
    for tool in ["protoc", "grpc_cpp_plugin"]:
        path = ctx.which(tool)
        if path == None:
            fail("%s not found (run tools/setup.sh)" % tool)
        ctx.symlink(path, tool)
    build.append('exports_files(["protoc", "grpc_cpp_plugin"])')
    ctx.file("BUILD.bazel", "\n".join(build) + "\n")
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)

system_libs = repository_rule(
    implementation = _system_libs_impl,
    local = True,
    configure = True,
)
