// mutual TLS for the control API and migration: one certificate/key/CA set per VMM. With it,
// every listener requires and verifies a client certificate signed by the CA, and outgoing
// migrations present the certificate and verify the destination against the CA.
#ifndef MICROVMM_API_TLS_H_
#define MICROVMM_API_TLS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace microvmm {

struct TlsFiles {
  std::string cert;  // PEM certificate chain of this VMM
  std::string key;   // PEM private key
  std::string ca;    // PEM CA bundle that peers' certificates must chain to
  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

struct TlsCredentials {
  std::shared_ptr<grpc::ServerCredentials> server;   // null: insecure
  std::shared_ptr<grpc::ChannelCredentials> channel; // null: insecure
};

// Reads the files; all three must be given together. INVALID_ARGUMENT names what is wrong.
absl::StatusOr<TlsCredentials> LoadTlsCredentials(const TlsFiles& files);

}  // namespace microvmm

#endif  // MICROVMM_API_TLS_H_
