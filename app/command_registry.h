// Subcommands register themselves here, so adding one is adding one file to app/.
// Each cmd_*.cpp does:
//   static flexcp::CommandRegistration reg("train", "Train a model from a YAML config", setup_train);
// where setup_train(CLI::App& sub) adds options and sets sub.callback(...). A callback reports bad
// input by throwing flexcp::UserError (exit 2); main() prints it as one line.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace flexcp {

struct CommandInfo {
  std::string name;
  std::string description;
  std::function<void(CLI::App&)> setup;
};

std::vector<CommandInfo>& command_registry();

struct CommandRegistration {
  CommandRegistration(std::string name, std::string description, std::function<void(CLI::App&)> setup) {
    command_registry().push_back({std::move(name), std::move(description), std::move(setup)});
  }
};

// Exit code of the command that ran (callbacks set it when they want something other than 0).
int& command_exit_code();

}  // namespace flexcp
