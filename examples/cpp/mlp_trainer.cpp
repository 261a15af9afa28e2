// A native LibTorch trainer on Zeal's C++ API: an MLP regressing a fixed random linear map,
// data parallel over the ranks mpirun started. Each rank draws its own share of every global
// batch. At the end every rank checks that its weights equal rank 0's (the replicas must stay
// identical) and that the loss fell; the process exits non-zero otherwise.
//
// With a third argument, it also saves a checkpoint there, scrambles the weights, loads the
// checkpoint back and checks the weights and the step count came back exactly.
//
//   mpirun -np 2 build/py/examples/cpp/zeal_mlp_trainer configs/mlp_cpp.json [steps] [checkpoint_dir]
#include <cstdio>

#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/functional/loss.h>

#include "zeal/zeal.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CONFIG.json [steps]\n", argv[0]);
    return 2;
  }
  int steps = argc > 2 ? std::atoi(argv[2]) : 60;
  try {
    torch::manual_seed(0);
    auto model = std::make_shared<torch::nn::SequentialImpl>(torch::nn::Linear(8, 32), torch::nn::ReLU(),
                                                             torch::nn::Linear(32, 1));
    auto engine = zeal::initialize(model, zeal::Config::from_file(argv[1]));
    const int rank = engine.rank(), world = engine.world_size();
    const int64_t micro = engine.batch().micro_batch_size;

    torch::manual_seed(1234);
    torch::Tensor true_map = torch::randn({8, 1});
    double first_loss = 0, last_loss = 0;
    for (int step = 0; step < steps; ++step) {
      // The global batch of this step; this rank takes its slice.
      torch::Tensor x = torch::randn({micro * world, 8});
      torch::Tensor y = x.matmul(true_map);
      auto mine = torch::indexing::Slice(rank * micro, (rank + 1) * micro);
      torch::Tensor loss = torch::nn::functional::mse_loss(engine.forward(x.index({mine})), y.index({mine}));
      engine.backward(loss);
      engine.step();
      if (step == 0) first_loss = loss.item<double>();
      last_loss = loss.item<double>();
    }

    // The replicas must hold identical weights: compare against rank 0's.
    auto comm = engine.core().world();
    bool same = true;
    for (auto& p : model->parameters()) {
      torch::Tensor mine = p.detach().clone();
      torch::Tensor root = mine.clone();
      comm->broadcast(root, {0})->wait();
      same = same && torch::equal(mine, root);
    }
    std::printf("rank %d: loss %.5f -> %.5f after %lld steps, replicas identical: %s\n", rank, first_loss, last_loss,
                static_cast<long long>(engine.global_steps()), same ? "yes" : "no");
    bool restored = true;
    if (argc > 3) {
      std::vector<torch::Tensor> saved;
      for (auto& p : model->parameters()) saved.push_back(p.detach().clone());
      engine.save_checkpoint(argv[3], "final", R"({"steps": )" + std::to_string(steps) + "}");
      {
        torch::NoGradGuard no_grad;
        for (auto& p : model->parameters()) p.mul_(0.0);
      }
      auto [path, client] = engine.load_checkpoint(argv[3]);
      for (size_t i = 0; i < saved.size(); ++i) restored = restored && torch::equal(model->parameters()[i], saved[i]);
      restored = restored && engine.global_steps() == steps && client.find(std::to_string(steps)) != std::string::npos;
      std::printf("rank %d: checkpoint %s round trip: %s\n", rank, path.c_str(), restored ? "exact" : "WRONG");
    }
    zeal::comm::shutdown();
    return (same && restored && last_loss < 0.5 * first_loss) ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
