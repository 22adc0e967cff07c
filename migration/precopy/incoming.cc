#include "migration/precopy/incoming.h"

#include "absl/time/clock.h"
#include "api/listen.h"

namespace microvmm::migration {

absl::StatusOr<std::unique_ptr<IncomingMigration>> IncomingMigration::Listen(
    const std::string& address, VmConfig local, MigrationDestination::DoneFn done,
    std::shared_ptr<grpc::ServerCredentials> credentials) {
  std::unique_ptr<IncomingMigration> in(new IncomingMigration());
  in->service_ = std::make_unique<MigrationDestination>(std::move(local), std::move(done));
  auto server = StartGrpcServer(address, in->service_.get(), "migration listener", &in->port_,
                                std::move(credentials));
  if (!server.ok()) return server.status();
  in->server_ = std::move(*server);
  return in;
}

IncomingMigration::~IncomingMigration() {
  if (server_) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  server_.reset();
  service_.reset();
}

}  // namespace microvmm::migration
