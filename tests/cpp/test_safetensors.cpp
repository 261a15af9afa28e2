// The checkpoint file layer: safetensors round trip, partial reads, and rejection of truncated
// and corrupted files with messages that say what is wrong.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <ATen/ATen.h>

#include "zeal/checkpoint/safetensors.h"
#include "zeal/core/error.h"

using namespace zeal::checkpoint;

namespace {
std::string temp_file(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("zeal_test_" + std::to_string(::getpid()) + "_" + name)).string();
}

std::string error_of(const std::string& path) {
  try {
    SafetensorsReader r(path);
    for (const auto& [name, e] : r.entries()) r.verify(name);
  } catch (const zeal::CheckpointError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Safetensors, RoundTripAndPartialRead) {
  std::string path = temp_file("rt.safetensors");
  at::Tensor a = at::arange(10, at::kFloat), b = at::arange(6, at::kBFloat16).view({2, 3});
  write_safetensors(path, {{"a", a}, {"b", b}}, {{"rank", "3"}});
  SafetensorsReader r(path);
  EXPECT_EQ(r.metadata().at("rank"), "3");
  EXPECT_TRUE(at::equal(r.read_all("a"), a));
  EXPECT_TRUE(at::equal(r.read_all("b"), b));
  at::Tensor part = at::empty({4}, at::kFloat);
  r.read("a", 3, 7, part);
  EXPECT_TRUE(at::equal(part, a.slice(0, 3, 7)));
  r.verify("a");
  EXPECT_THROW(r.entry("c"), zeal::CheckpointError);
  std::remove(path.c_str());
}

TEST(Safetensors, RejectsTruncatedAndCorruptedFiles) {
  std::string path = temp_file("bad.safetensors");
  write_safetensors(path, {{"a", at::arange(100, at::kFloat)}}, {});
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto rewrite = [&](const std::string& content) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << content;
  };
  rewrite(bytes.substr(0, bytes.size() - 4));
  EXPECT_NE(error_of(path).find("truncated"), std::string::npos) << error_of(path);
  std::string flipped = bytes;
  flipped[flipped.size() - 10] ^= 0x40;
  rewrite(flipped);
  EXPECT_NE(error_of(path).find("CRC32"), std::string::npos) << error_of(path);
  rewrite(bytes.substr(0, 5));
  EXPECT_NE(error_of(path).find("8-byte header"), std::string::npos) << error_of(path);
  rewrite(bytes);
  EXPECT_EQ(error_of(path), "");
  std::remove(path.c_str());
}
