// Listens for one incoming migration: the Migration service plus its gRPC server.
#ifndef MICROVMM_MIGRATION_PRECOPY_INCOMING_H_
#define MICROVMM_MIGRATION_PRECOPY_INCOMING_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "migration/precopy/destination.h"

namespace microvmm::migration {

class IncomingMigration {
 public:
  // Starts listening on `address`. `done` is called once (on a gRPC thread) with the running VM
  // or the error; it must not destroy this object.
  static absl::StatusOr<std::unique_ptr<IncomingMigration>> Listen(
      const std::string& address, VmConfig local, MigrationDestination::DoneFn done,
      std::shared_ptr<grpc::ServerCredentials> credentials = nullptr);
  ~IncomingMigration();  // stops the server (in-flight calls get a short grace period)

  int port() const { return port_; }  // TCP port when listening on HOST:0

 private:
  IncomingMigration() = default;
  std::unique_ptr<MigrationDestination> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_PRECOPY_INCOMING_H_
