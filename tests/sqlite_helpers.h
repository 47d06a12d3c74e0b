// Tests that reach into a results store's SQLite file directly (to fake an old or newer schema).
#pragma once

#include <catch2/catch.hpp>
#include <sqlite3.h>

#include <string>

namespace moesim::testing {

// Runs `sql` on the SQLite file at `path`; fails the test when SQLite refuses it.
inline void raw_sql(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
  INFO((err != nullptr ? err : ""));
  sqlite3_free(err);
  sqlite3_close(db);
  REQUIRE(rc == SQLITE_OK);
}

}  // namespace moesim::testing
