#include "vmm/boot/aml.h"

namespace microvmm::aml {
namespace {

void Put(Bytes& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

}  // namespace

void Append(Bytes& b, const Bytes& more) { b.insert(b.end(), more.begin(), more.end()); }

Bytes PkgLength(size_t body) {
  Bytes b;
  if (body + 1 < 0x40) {
    Put(b, body + 1, 1);
    return b;
  }
  for (int extra = 1; extra <= 3; ++extra) {
    size_t total = body + 1 + extra;
    if (total < (size_t{1} << (4 + 8 * extra))) {
      Put(b, (extra << 6) | (total & 0xF), 1);
      for (int i = 0; i < extra; ++i) Put(b, total >> (4 + 8 * i), 1);
      return b;
    }
  }
  return b;  // > 256 MiB: not reachable for our tables (the callers bound the total size)
}

Bytes Pkg(std::initializer_list<uint8_t> op, const Bytes& head, const Bytes& terms) {
  Bytes b(op);
  Append(b, PkgLength(head.size() + terms.size()));
  Append(b, head);
  Append(b, terms);
  return b;
}

Bytes Integer(uint64_t v) {
  Bytes b;
  if (v == 0) {
    b.push_back(kZeroOp);
  } else if (v == 1) {
    b.push_back(kOneOp);
  } else if (v <= 0xFF) {
    b.push_back(kBytePrefix);
    Put(b, v, 1);
  } else if (v <= 0xFFFF) {
    b.push_back(kWordPrefix);
    Put(b, v, 2);
  } else if (v <= 0xFFFFFFFF) {
    b.push_back(kDWordPrefix);
    Put(b, v, 4);
  } else {
    b.push_back(kQWordPrefix);
    Put(b, v, 8);
  }
  return b;
}

Bytes Name(std::string_view seg, const Bytes& data) {
  Bytes b{kNameOp};
  b.insert(b.end(), seg.begin(), seg.end());
  Append(b, data);
  return b;
}

Bytes String(std::string_view s) {
  Bytes b{kStringPrefix};
  b.insert(b.end(), s.begin(), s.end());
  b.push_back(0);
  return b;
}

Bytes Scope(std::string_view name, const Bytes& terms) {
  return Pkg({kScopeOp}, Bytes(name.begin(), name.end()), terms);
}

Bytes Device(std::string_view seg, const Bytes& terms) {
  return Pkg({kExtOpPrefix, kDeviceOp}, Bytes(seg.begin(), seg.end()), terms);
}

Bytes Method(std::string_view seg, uint8_t args, const Bytes& terms) {
  Bytes head(seg.begin(), seg.end());
  head.push_back(args & 7);
  return Pkg({kMethodOp}, head, terms);
}

Bytes Store(const Bytes& src, const Bytes& dst) {
  Bytes b{kStoreOp};
  Append(b, src);
  Append(b, dst);
  return b;
}

Bytes Buffer(const Bytes& data) { return Pkg({kBufferOp}, Integer(data.size()), data); }

Bytes Package(const std::vector<Bytes>& elements) {
  Bytes body{static_cast<uint8_t>(elements.size())};
  for (const Bytes& e : elements) Append(body, e);
  return Pkg({kPackageOp}, {}, body);
}

Bytes ResourceTemplate(Bytes descriptors) {
  descriptors.push_back(0x79);  // End Tag
  descriptors.push_back(0);     // checksum 0: "treat as correct"
  return Buffer(descriptors);
}

}  // namespace microvmm::aml
