// The master store alone (engine/master_store.h, Note [Master store]): the same optimizer steps
// give the same master weights whether they live on the device, in host memory or in NVMe swap
// files a sub-group at a time; staged gradients are used only when every bucket arrived; the
// checkpoint round trip (materialise, release) and a patched range survive in the swap files.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "zeal/core/config.h"
#include "zeal/engine/master_store.h"
#include "zeal/optim/optimizer.h"

using zeal::Config;
using zeal::engine::MasterStore;

namespace {

constexpr int64_t kShard = 37;  // not a multiple of the NVMe sub-group: the last one is short

Config config_for(const std::string& offload_device, const std::string& dir) {
  std::string offload = offload_device.empty()
                            ? ""
                            : R"(, "offload_optimizer": {"device": ")" + offload_device + R"(")" +
                                  (dir.empty() ? std::string() : R"(, "nvme_path": ")" + dir + R"(")") + "}";
  return Config::from_string(R"({"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
      "zero_optimization": {"stage": 2, "sub_group_size": 10)" + offload + "}}");
}

std::vector<zeal::optim::ParamGroup> segments(const Config& c) {
  zeal::optim::ParamGroup g;
  g.begin = 0;
  g.end = kShard;
  g.lr = c.optimizer.lr;
  g.betas = c.optimizer.betas;
  g.eps = c.optimizer.eps;
  g.weight_decay = c.optimizer.weight_decay;
  return {g};
}

// Three steps of `store` from `initial`; returns the master weights after them (fp32, on the host).
at::Tensor run(const std::string& device, const at::Tensor& initial, std::vector<at::Tensor>* written = nullptr) {
  const std::string dir = (std::filesystem::temp_directory_path() / "zeal-master-store-test").string();
  std::filesystem::create_directories(dir);
  const Config c = config_for(device, dir);
  MasterStore store(c, at::kFloat, at::kCPU);
  const int64_t sub_group = store.nvme() ? 10 : kShard;
  auto optimizer = zeal::optim::make_optimizer(c.optimizer, sub_group, at::kCPU, 1, true);
  at::Tensor model = initial.clone();  // what the store publishes to (owned coordinates)
  if (!store.nvme()) store.place(initial.clone());
  store.bind(*optimizer, kShard, [&](int64_t b, int64_t e) { return model.slice(0, b, e).clone(); });
  for (int step = 0; step < 3; ++step) {
    at::Tensor grads = at::sin(at::arange(kShard, at::kFloat) * (step + 1));
    at::Tensor out = store.step(*optimizer, store.step_gradients([&] { return grads; }, 1), segments(c),
                                [&](int64_t b, const at::Tensor& v) { model.slice(0, b, b + v.numel()).copy_(v); });
    if (out.defined()) model.copy_(out);
  }
  if (written) written->push_back(model.clone());
  if (!store.swapper()) return store.master().clone();
  store.materialize(*optimizer);
  at::Tensor master = store.master().clone();
  store.release(*optimizer, /*write_back=*/false);
  EXPECT_FALSE(store.master().defined());  // back on disk only
  // A patched range reaches the files: materialise again and read it back.
  store.patch(5, at::full({12}, 7.0f));
  store.materialize(*optimizer);
  EXPECT_TRUE(at::equal(store.master().slice(0, 5, 17), at::full({12}, 7.0f)));
  EXPECT_TRUE(at::equal(store.master().slice(0, 0, 5), master.slice(0, 0, 5)));
  store.release(*optimizer, true);
  return master;
}

}  // namespace

TEST(MasterStore, DeviceHostAndNvmeStepAlike) {
  const at::Tensor initial = at::linspace(-1.0, 1.0, kShard, at::kFloat);
  std::vector<at::Tensor> published;
  const at::Tensor device = run("", initial, &published);
  const at::Tensor host = run("cpu", initial, &published);
  const at::Tensor nvme = run("nvme", initial, &published);
  EXPECT_FALSE(at::equal(device, initial));  // the steps moved it
  EXPECT_TRUE(at::allclose(host, device, 1e-6, 1e-7));
  EXPECT_TRUE(at::allclose(nvme, device, 1e-6, 1e-7));  // sub-group tails may take the scalar path
  // What each published to the model is the master weights (fp32 model).
  for (const at::Tensor& p : published) EXPECT_TRUE(at::allclose(p, device, 1e-6, 1e-7));
}

TEST(MasterStore, StagedGradientsOnlyWhenEveryBucketArrived) {
  const Config c = config_for("cpu", "");
  MasterStore store(c, at::kBFloat16, at::kCPU);  // bf16 on the host: gradients are staged as fp32
  ASSERT_TRUE(store.stages_gradients());
  store.begin_backward();
  store.stage(4, 0, at::tensor({1.0f, 2.0f}));
  store.bucket_staged();
  bool asked = false;
  // One of two buckets staged: the step takes the reduction's gradients, copied to the host in fp32.
  at::Tensor g = store.step_gradients(
      [&] {
        asked = true;
        return at::tensor({5.0f, 6.0f, 7.0f, 8.0f}).to(at::kBFloat16);
      },
      2);
  EXPECT_TRUE(asked);
  EXPECT_EQ(g.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(g, at::tensor({5.0f, 6.0f, 7.0f, 8.0f})));
  // Both staged: the staged values, without asking.
  store.begin_backward();
  store.stage(4, 0, at::tensor({1.0f, 2.0f}));
  store.bucket_staged();
  store.stage(4, 2, at::tensor({3.0f, 4.0f}));
  store.bucket_staged();
  asked = false;
  g = store.step_gradients([&] { asked = true; return at::Tensor(); }, 2);
  EXPECT_FALSE(asked);
  EXPECT_TRUE(at::equal(g, at::tensor({1.0f, 2.0f, 3.0f, 4.0f})));
}
