#include "api/tls.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace microvmm {
namespace {
absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  std::ifstream f(path);
  if (!f) return absl::InvalidArgumentError(absl::StrCat("cannot read TLS ", what, " '", path, "'"));
  std::stringstream ss;
  ss << f.rdbuf();
  std::string pem = ss.str();
  if (!absl::StrContains(pem, "-----BEGIN "))
    return absl::InvalidArgumentError(absl::StrCat("TLS ", what, " '", path, "' is not PEM"));
  return pem;
}
}  // namespace

absl::StatusOr<TlsCredentials> LoadTlsCredentials(const TlsFiles& files) {
  TlsCredentials out;
  if (!files.enabled()) return out;
  if (files.cert.empty() || files.key.empty() || files.ca.empty())
    return absl::InvalidArgumentError("mTLS needs all of --tls-cert, --tls-key and --tls-ca");
  auto cert = ReadPem(files.cert, "certificate");
  if (!cert.ok()) return cert.status();
  auto key = ReadPem(files.key, "key");
  if (!key.ok()) return key.status();
  auto ca = ReadPem(files.ca, "CA");
  if (!ca.ok()) return ca.status();
  grpc::SslServerCredentialsOptions so(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  so.pem_root_certs = *ca;
  so.pem_key_cert_pairs.push_back({*key, *cert});
  out.server = grpc::SslServerCredentials(so);
  grpc::SslCredentialsOptions co;
  co.pem_root_certs = *ca;
  co.pem_private_key = *key;
  co.pem_cert_chain = *cert;
  out.channel = grpc::SslCredentials(co);
  return out;
}

}  // namespace microvmm
