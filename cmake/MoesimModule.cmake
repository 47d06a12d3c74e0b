# moesim_proto_library(target protos...): compiles .proto files (paths relative to the current
# folder) with imports and generated headers named from the repository root, e.g.
# import "topologies/hardware.proto" and #include "topologies/hardware.pb.h".
function(moesim_proto_library target)
  set(srcs)
  foreach(proto ${ARGN})
    get_filename_component(abs ${proto} ABSOLUTE)
    file(RELATIVE_PATH rel ${PROJECT_SOURCE_DIR} ${abs})
    string(REGEX REPLACE "\\.proto$" "" stem ${rel})
    set(out ${PROJECT_BINARY_DIR}/proto/${stem})
    add_custom_command(
      OUTPUT ${out}.pb.cc ${out}.pb.h
      COMMAND protobuf::protoc -I${PROJECT_SOURCE_DIR} --cpp_out=${PROJECT_BINARY_DIR}/proto ${abs}
      DEPENDS ${abs} protobuf::protoc
      COMMENT "protoc ${rel}")
    list(APPEND srcs ${out}.pb.cc)
  endforeach()
  add_library(${target} STATIC ${srcs})
  target_include_directories(${target} PUBLIC ${PROJECT_BINARY_DIR}/proto)
  target_link_libraries(${target} PUBLIC protobuf::libprotobuf)
endfunction()

# moesim_warnings(target): the warning policy for moesim's own code (not generated code).
function(moesim_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${MOESIM_WERROR}>>:-Werror>)
endfunction()

# moesim_module(NAME name [SOURCES ...] [PROTOS ...] [DEPENDS ...] [LIBS ...])
# One library target per top-level folder, `moesim_<name>` with alias `moesim::<name>`.
# Protos are compiled into a separate target (generated code is not held to our warning policy)
# and their headers are included as "<folder>/<file>.pb.h".
function(moesim_module)
  cmake_parse_arguments(M "" "NAME" "SOURCES;PROTOS;DEPENDS;LIBS" ${ARGN})
  set(target moesim_${M_NAME})
  set(deps)
  foreach(d ${M_DEPENDS})
    list(APPEND deps moesim::${d})
  endforeach()

  if(M_PROTOS)
    set(proto_target moesim_${M_NAME}_proto)
    moesim_proto_library(${proto_target} ${M_PROTOS})
    foreach(d ${M_DEPENDS})
      if(TARGET moesim_${d}_proto)
        target_link_libraries(${proto_target} PUBLIC moesim_${d}_proto)
      endif()
    endforeach()
    list(APPEND deps ${proto_target})
  endif()

  if(M_SOURCES)
    add_library(${target} STATIC ${M_SOURCES})
    target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR})
    target_link_libraries(${target} PUBLIC ${deps} ${M_LIBS})
    moesim_warnings(${target})
  else()
    add_library(${target} INTERFACE)
    target_include_directories(${target} INTERFACE ${PROJECT_SOURCE_DIR})
    target_link_libraries(${target} INTERFACE ${deps} ${M_LIBS})
  endif()
  add_library(moesim::${M_NAME} ALIAS ${target})
endfunction()
