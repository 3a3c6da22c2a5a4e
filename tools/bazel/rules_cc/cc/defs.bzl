"""Stand-in for @rules_cc//cc:defs.bzl: re-exports Bazel's native C++ rules.

Bazel 4 builtin BUILD files under @bazel_tools load("@rules_cc//cc:defs.bzl",
...); the real rules_cc is only a thin wrapper around the native rules, so
re-exporting them is enough for a Python-only workspace (no C++ is built).
"""

cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
fdo_prefetch_hints = native.fdo_prefetch_hints
fdo_profile = native.fdo_profile
objc_import = native.objc_import
objc_library = native.objc_library
