#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace hla {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxHeader = 100ull << 20;  // the format's own limit on header size

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && addr != MAP_FAILED) munmap(addr, size);
  }
};

}  // namespace

SafeTensorsFile::SafeTensorsFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  check(fd >= 0, path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file");
  }
  auto map = std::make_shared<Mapping>();
  map->size = size_t(st.st_size);
  if (map->size > 0) {
    map->addr = mmap(nullptr, map->size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    check(map->addr != MAP_FAILED, path + ": mmap failed (" + std::strerror(errno) + ")");
  } else {
    ::close(fd);
  }
  *this = from_bytes(map, static_cast<const uint8_t*>(map->addr), map->size, path);
}

SafeTensorsFile SafeTensorsFile::from_bytes(std::shared_ptr<const void> owner, const uint8_t* data,
                                            size_t size, const std::string& label) {
  SafeTensorsFile f;
  f.path_ = label;
  f.owner_ = std::move(owner);
  check(size >= 8, label + ": not a safetensors file (shorter than the 8-byte header length)");
  uint64_t n = 0;
  std::memcpy(&n, data, 8);
  check(n <= kMaxHeader, label + ": header length " + std::to_string(n) + " exceeds the 100 MB limit");
  check(n <= size - 8, label + ": header length " + std::to_string(n) + " runs past the end of the file (" +
                           std::to_string(size) + " bytes)");
  json header;
  try {
    header = json::parse(data + 8, data + 8 + n);
  } catch (const json::exception& e) {
    throw Error(label + ": header is not valid JSON (" + std::string(e.what()) + ")");
  }
  check(header.is_object(), label + ": header is not a JSON object");
  f.data_ = data + 8 + n;
  const size_t data_size = size - 8 - n;
  std::vector<std::pair<size_t, size_t>> ranges;
  for (auto& [name, e] : header.items()) {
    if (name == "__metadata__") {
      check(e.is_object(), label + ": __metadata__ is not an object");
      for (auto& [k, v] : e.items()) {
        check(v.is_string(), label + ": __metadata__." + k + " is not a string");
        f.metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string where = label + ": tensor '" + name + "'";
    check(e.is_object(), where + " entry is not an object");
    check(e.contains("dtype") && e["dtype"].is_string(), where + " has no dtype");
    check(e.contains("shape") && e["shape"].is_array(), where + " has no shape");
    check(e.contains("data_offsets") && e["data_offsets"].is_array() && e["data_offsets"].size() == 2,
          where + " has no data_offsets [begin, end]");
    Entry en{};
    check(dtype_from_name(e["dtype"].get<std::string>(), &en.dtype),
          where + " has unsupported dtype " + e["dtype"].get<std::string>());
    uint64_t numel = 1;
    for (auto& d : e["shape"]) {
      check(d.is_number_unsigned(), where + " has a non-integer or negative dimension");
      uint64_t v = d.get<uint64_t>();
      check(v < (1ull << 40) && (v == 0 || numel <= (1ull << 50) / v), where + " shape is too large");
      numel *= v;
      en.shape.push_back(int64_t(v));
    }
    for (auto& o : e["data_offsets"]) check(o.is_number_unsigned(), where + " has a bad data offset");
    uint64_t b = e["data_offsets"][0].get<uint64_t>(), en_ = e["data_offsets"][1].get<uint64_t>();
    check(b <= en_, where + " data_offsets begin > end");
    check(en_ <= data_size, where + " data_offsets [" + std::to_string(b) + ", " + std::to_string(en_) +
                                "] run past the end of the file (data section is " +
                                std::to_string(data_size) + " bytes)");
    check(en_ - b == numel * dtype_size(en.dtype),
          where + " byte size " + std::to_string(en_ - b) + " does not match dtype and shape " +
              shape_str(en.shape));
    en.begin = b;
    en.end = en_;
    if (en_ > b) ranges.emplace_back(b, en_);
    f.entries_[name] = std::move(en);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    check(ranges[i].first >= ranges[i - 1].second, label + ": tensors overlap in the data section");
  return f;
}

std::vector<std::string> SafeTensorsFile::names() const {
  std::vector<std::string> r;
  for (auto& [k, v] : entries_) r.push_back(k);
  return r;
}

Tensor SafeTensorsFile::get(const std::string& name) const {
  auto it = entries_.find(name);
  check(it != entries_.end(), path_ + ": no tensor '" + name + "'");
  const Entry& e = it->second;
  const uint8_t* p = data_ + e.begin;
  // safetensors does not promise alignment; an unaligned tensor is copied out so typed reads are safe.
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) != 0) {
    Tensor t = Tensor::zeros(e.dtype, e.shape);
    std::memcpy(t.raw(), p, e.end - e.begin);
    return t;
  }
  return Tensor::view_of(owner_, const_cast<uint8_t*>(p), e.dtype, e.shape);
}

void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  std::vector<Tensor> ordered;
  for (auto& [name, t] : tensors) {
    Tensor c = t.contiguous();
    header[name] = {{"dtype", dtype_name(c.dtype())},
                    {"shape", c.shape()},
                    {"data_offsets", {offset, offset + c.nbytes()}}};
    offset += c.nbytes();
    ordered.push_back(std::move(c));
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(bool(out), tmp + ": cannot open for writing");
    uint64_t n = h.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(h.data(), std::streamsize(h.size()));
    for (auto& t : ordered) out.write(static_cast<const char*>(t.raw()), std::streamsize(t.nbytes()));
    out.flush();
    check(bool(out), tmp + ": write failed");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  check(!ec, path + ": cannot rename temp file (" + ec.message() + ")");
}

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  check(fs::is_directory(dir), dir + ": model directory not found");
  auto add_file = [&](const fs::path& p) {
    files_.push_back(std::make_unique<SafeTensorsFile>(p.string()));
    for (auto& n : files_.back()->names()) where_.emplace(n, files_.size() - 1);
  };
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(index)) {
    std::ifstream in(index);
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      throw Error(index.string() + ": not valid JSON (" + e.what() + ")");
    }
    check(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
          index.string() + ": missing field 'weight_map'");
    std::map<std::string, size_t> file_index;
    for (auto& [name, file] : j["weight_map"].items()) {
      check(file.is_string(), index.string() + ": weight_map." + name + " is not a file name");
      std::string fn = file.get<std::string>();
      check(fn.find('/') == std::string::npos, index.string() + ": weight_map." + name + " names a path outside the model directory");
      if (!file_index.count(fn)) {
        check(fs::exists(fs::path(dir) / fn), (fs::path(dir) / fn).string() + ": shard listed in model.safetensors.index.json is missing");
        add_file(fs::path(dir) / fn);
        file_index[fn] = files_.size() - 1;
      }
      check(files_[file_index[fn]]->has(name),
            (fs::path(dir) / fn).string() + ": tensor '" + name + "' listed in the index is missing");
      where_[name] = file_index[fn];
    }
  } else if (fs::exists(single)) {
    add_file(single);
  } else {
    std::vector<fs::path> shards;
    for (auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".safetensors" && e.path().filename() != "reference.safetensors")
        shards.push_back(e.path());
    std::sort(shards.begin(), shards.end());
    check(!shards.empty(), dir + ": no model.safetensors, model.safetensors.index.json or *.safetensors");
    for (auto& p : shards) add_file(p);
  }
}

Tensor Checkpoint::get(const std::string& name) const {
  auto it = where_.find(name);
  check(it != where_.end(), dir_ + ": checkpoint has no tensor '" + name + "'");
  return files_[it->second]->get(name);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> r;
  for (auto& [k, v] : where_) r.push_back(k);
  return r;
}

}  // namespace hla
