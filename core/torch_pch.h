// Precompiled header for flexcp_core: the LibTorch headers nearly every core file needs.
// Keep it to stable third-party headers; project headers here would rebuild everything on each edit.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/embedding.h>
#include <torch/autograd.h>
#include <torch/optim/adamw.h>
#include <c10/util/Exception.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>
#include <string>
#include <vector>
#include <memory>
#include <functional>
