// safetensors: the checkpoint format of every Hugging Face model hla loads.
// File layout: u64 little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
// then the data section; offsets are relative to its start. The reader mmaps the file and checks
// everything a corrupt or truncated file could get wrong before any tensor is touched.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace hla {

class SafeTensorsFile {
 public:
  // Opens and validates `path`; throws hla::Error naming the file (and tensor) on any defect.
  explicit SafeTensorsFile(const std::string& path);
  // Validates an in-memory image (used by the fuzzer and by open()).
  static SafeTensorsFile from_bytes(std::shared_ptr<const void> owner, const uint8_t* data,
                                    size_t size, const std::string& label);

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  std::vector<std::string> names() const;
  // A zero-copy view (the mapping stays alive while the tensor does).
  Tensor get(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafeTensorsFile() = default;
  struct Entry {
    DType dtype;
    Shape shape;
    size_t begin, end;
  };
  std::string path_;
  std::shared_ptr<const void> owner_;
  const uint8_t* data_ = nullptr;  // start of the data section
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (any dtype, made contiguous) to `path` atomically (temp file + rename).
void write_safetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// All tensors of a checkpoint directory: `model.safetensors`, or the shards listed in
// `model.safetensors.index.json` (weight_map name -> file), or every *.safetensors file.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir);
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  Tensor get(const std::string& name) const;  // error names the tensor and the directory
  std::vector<std::string> names() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafeTensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

}  // namespace hla
