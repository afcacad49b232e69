// flexcp: pretrain Llama-family models with flexible flash attention and context parallelism.
#include <algorithm>
#include <iostream>

#include "app/command_registry.h"
#include "core/errors.h"

namespace flexcp {
std::vector<CommandInfo>& command_registry() {
  static std::vector<CommandInfo> registry;
  return registry;
}
int& command_exit_code() {
  static int code = 0;
  return code;
}
}  // namespace flexcp

int main(int argc, char** argv) {
  CLI::App app{"flexcp: native Llama pretraining with flexible flash attention and context parallelism"};
  app.set_version_flag("--version", std::string("flexcp ") + FLEXCP_VERSION);
  app.require_subcommand(1);
  auto& cmds = flexcp::command_registry();
  std::sort(cmds.begin(), cmds.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  for (auto& c : cmds) c.setup(*app.add_subcommand(c.name, c.description));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const flexcp::UserError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const flexcp::RankFailure& e) {
    std::cerr << "error: " << e.what() << "\n";
    return flexcp::kRankFailureExitCode;
  } catch (const std::exception& e) {
    std::cerr << "internal error: " << e.what() << "\n";
    return 1;
  }
  return flexcp::command_exit_code();
}
