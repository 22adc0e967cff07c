"""cc_proto: protoc + grpc_cpp_plugin from the system, wrapped in a cc_library.

Proto files import each other by workspace-relative path (import "proto/vm_state.proto";).
"""

def cc_proto(name, srcs, deps = [], proto_deps = [], grpc = False, visibility = None):
    """Generates C++ (and optionally gRPC) code for `srcs`.

    Args:
      name: cc_library name.
      srcs: .proto files in this package.
      deps: cc_proto targets whose messages these files import.
      proto_deps: the .proto files those targets were generated from (protoc reads them).
      grpc: also run grpc_cpp_plugin.
      visibility: visibility of the cc_library.
    """
    pkg = native.package_name()
    outs_cc = []
    outs_h = []
    for s in srcs:
        base = s[:-len(".proto")]
        outs_cc.append(base + ".pb.cc")
        outs_h.append(base + ".pb.h")
        if grpc:
            outs_cc.append(base + ".grpc.pb.cc")
            outs_h.append(base + ".grpc.pb.h")
    tools = ["@system//:protoc"]
    cmd = "$(location @system//:protoc) -I. --cpp_out=$(GENDIR)"
    if grpc:
        tools.append("@system//:grpc_cpp_plugin")
        cmd += " --plugin=protoc-gen-grpc=$(location @system//:grpc_cpp_plugin) --grpc_out=$(GENDIR)"
    cmd += " " + " ".join(["%s/%s" % (pkg, s) if pkg else s for s in srcs])
    native.genrule(
        name = name + "_gen",
        srcs = srcs + proto_deps,
        outs = outs_cc + outs_h,
        cmd = cmd,
        tools = tools,
    )
    native.cc_library(
        name = name,
        srcs = outs_cc,
        hdrs = outs_h,
        deps = deps + ["@system//:protobuf"] + (["@system//:grpc"] if grpc else []),
        visibility = visibility,
    )
