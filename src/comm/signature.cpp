#include "signature.h"

#include <algorithm>

namespace zeal::comm {
namespace {

const char* const kOpNames[] = {"all_reduce", "reduce_scatter", "all_gather", "broadcast",
                                "reduce",     "all_to_all",     "barrier",    "all_to_all_v"};
constexpr int kOps = static_cast<int>(sizeof(kOpNames) / sizeof(kOpNames[0]));

}  // namespace

int op_code(const std::string& op_name) {
  for (int i = 0; i < kOps; ++i)
    if (op_name == kOpNames[i]) return i;
  return -1;
}

Signature Signature::of(const std::string& op_name, const at::Tensor& tensor, const std::string& site, int reduce,
                        int root) {
  Signature sig;
  sig.op = op_code(op_name);
  sig.count = tensor.defined() ? tensor.numel() : -1;
  sig.dtype = tensor.defined() ? static_cast<int32_t>(tensor.scalar_type()) : -1;
  sig.reduce = reduce;
  sig.root = root;
  std::strncpy(sig.site, site.c_str(), kSiteChars - 1);
  return sig;
}

const char* Signature::op_name() const { return op >= 0 && op < kOps ? kOpNames[op] : "op?"; }

std::string Signature::describe() const {
  std::string out = op_name() + std::string(" #") + std::to_string(seq) + " (";
  std::string site_text(site, strnlen(site, kSiteChars));
  if (!site_text.empty()) out += site_text + ", ";
  if (count >= 0) {
    if (op_name() == std::string("all_to_all_v")) out += "rows of ";
    out += std::to_string(count) + " x " +
           (dtype >= 0 ? std::string(c10::toString(static_cast<at::ScalarType>(dtype))) : std::string("?"));
  } else {
    out += "no data";
  }
  if (reduce >= 0) out += std::string(", ") + to_string(static_cast<ReduceOp>(reduce));
  if (root >= 0) out += ", root " + std::to_string(root);
  return out + ")";
}

bool signatures_differ(const std::vector<const Signature*>& signatures) {
  const Signature* first = nullptr;
  for (const Signature* s : signatures) {
    if (!s) continue;
    if (!first) {
      first = s;
    } else if (!s->same_as(*first)) {
      return true;
    }
  }
  return false;
}

std::string describe_mismatch(const std::string& group, uint64_t seq, int this_rank,
                              const std::vector<const Signature*>& signatures, const std::vector<int>& world_ranks) {
  std::vector<std::pair<const Signature*, std::vector<int>>> groups;
  for (size_t r = 0; r < signatures.size(); ++r) {
    const Signature* sig = signatures[r];
    if (!sig) continue;
    auto same = std::find_if(groups.begin(), groups.end(), [&](const auto& e) { return e.first->same_as(*sig); });
    if (same == groups.end()) {
      groups.push_back({sig, {static_cast<int>(r)}});
    } else {
      same->second.push_back(static_cast<int>(r));
    }
  }
  std::stable_sort(groups.begin(), groups.end(),
                   [](const auto& a, const auto& b) { return a.second.size() < b.second.size(); });
  auto list = [&](const std::vector<int>& ranks, bool world) {
    std::string out;
    for (int r : ranks) out += (out.empty() ? "" : ", ") + std::to_string(world ? world_ranks[r] : r);
    return out;
  };
  std::string message = "collective mismatch on group " + group + ": the ranks disagree about op #" +
                        std::to_string(seq) + ":";
  for (size_t i = 0; i < groups.size(); ++i) {
    const auto& ranks = groups[i].second;
    message += std::string(i ? ";" : "") + (ranks.size() == 1 ? " rank " : " ranks ") + list(ranks, false) +
               " (world " + list(ranks, true) + ") " + (ranks.size() == 1 ? "is" : "are") + " at " +
               groups[i].first->describe();
  }
  if (groups.size() >= 2) {
    // The divergent ranks: the smallest group, when it is the only one of its size.
    message += groups[0].second.size() < groups[1].second.size()
                   ? " [diverged: world ranks " + list(groups[0].second, true) + "]"
                   : " [diverged: world ranks " + list(groups[0].second, true) + " or " + list(groups[1].second, true) +
                         "]";
  }
  return message + " (a rank skipped, reordered or resized a collective; this rank is " + std::to_string(this_rank) +
         ")";
}

}  // namespace zeal::comm
