// Serve a MIND user tower exported with `python -m mind export --to aoti` from C++, with libtorch only.
//
//   mind_tower <export folder>/user_tower.pt2 <routing op library> <item indices, comma-separated> [features]
//
// The package calls the fused routing op `mind_kernels::routing_forward`, so the op's library must be
// loaded into the process first: here it is mind_kernels' compiled extension (`mind_kernels/_C*.so`,
// whose only Python symbol is its module init, never called here, hence RTLD_LAZY). A C++ service
// would link the same sources (csrc/schema.cpp, csrc/routing_cpu.cpp, ...) into its own binary instead.
//
// Input: one user's history as item indices (the rows of item_embeddings.npy / items.json, 0 = padding)
// and optional profile feature indices (0 = unknown). Output: one line per interest, "interest k
// active|inactive: v_0 v_1 ...", the K x d vectors the Python server computes for that history.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <dlfcn.h>

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

static std::vector<int64_t> parse_list(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(std::stoll(item));
  }
  return out;
}

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::fprintf(stderr, "usage: %s user_tower.pt2 routing_op_library.so item,indices [feature,indices]\n", argv[0]);
    return 2;
  }
  if (!dlopen(argv[2], RTLD_LAZY | RTLD_GLOBAL)) {
    std::fprintf(stderr, "error: cannot load the routing op library %s: %s\n", argv[2], dlerror());
    return 2;
  }
  std::vector<int64_t> history, features;
  try {
    history = parse_list(argv[3]);
    features = argc == 5 ? parse_list(argv[4]) : std::vector<int64_t>{};
  } catch (const std::exception&) {
    std::fprintf(stderr, "error: item and feature indices must be comma-separated integers\n");
    return 2;
  }
  if (history.empty()) {
    std::fprintf(stderr, "error: the history is empty\n");
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    auto ids = torch::tensor(history, torch::kLong).unsqueeze(0);            // (1, L)
    auto mask = ids.ne(0);                                                    // (1, L) bool
    auto feats = torch::tensor(features, torch::kLong).reshape({1, -1});      // (1, F)
    std::vector<at::Tensor> out = loader.run({ids, mask, feats});
    auto interests = out[0][0].contiguous();                                  // (K, d)
    auto active = out[1][0].contiguous();                                     // (K,)
    for (int64_t k = 0; k < interests.size(0); ++k) {
      std::printf("interest %lld %s:", static_cast<long long>(k), active[k].item<bool>() ? "active" : "inactive");
      for (int64_t j = 0; j < interests.size(1); ++j) std::printf(" %.9g", interests[k][j].item<float>());
      std::printf("\n");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
