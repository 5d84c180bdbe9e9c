// What the layers' CPU kernels need from PyTorch: tensors, the thread pool and pybind11's casters for tensors.
// <torch/extension.h> (the whole C++ frontend) took about 40 s of a kernel's 60 s build to parse on a 2-core
// machine; these headers take about a quarter of that.  (Allocating through Tensor methods such as new_empty
// keeps <ATen/ops/empty.h>, another 9 s, out.)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>
