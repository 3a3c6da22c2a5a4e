/* Runs one float32 tensor through a SavedModel with the TensorFlow C API, the way TF Serving loads models.
 *
 * Usage: run_saved_model EXPORT_DIR INPUT_TENSOR OUTPUT_TENSOR INPUT_FILE
 *
 *   EXPORT_DIR     a SavedModel directory; loaded with the tag "serve" by TF_LoadSessionFromSavedModel.
 *   INPUT_TENSOR   graph tensor to feed, "op_name:index" (e.g. "serving_default_images:0"); ":index" defaults to 0.
 *   OUTPUT_TENSOR  graph tensor to fetch, same form (e.g. "StatefulPartitionedCall:0").
 *   INPUT_FILE     raw little-endian file: int32 rank, int64 dims[rank], float32 data[prod(dims)], nothing after.
 *
 * Prints the output shape on the first line (dims separated by single spaces; an empty line for a scalar), then
 * every output value in row-major order, one per line, with "%.9g" (enough digits to round-trip a float32).
 * Any error goes to stderr and the exit code is 1. Built by tests/c_api_loader.py; no Python involved at run time.
 */

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorflow/c/c_api.h"

#define MAX_RANK 32

/* Reads exactly `size` bytes; returns 0 on success. */
static int read_exactly(FILE* file, void* buffer, size_t size) {
  return fread(buffer, 1, size, file) == size ? 0 : -1;
}

/* Reads INPUT_FILE into a newly allocated TF_FLOAT tensor; returns NULL (after printing why) on failure. */
static TF_Tensor* read_input_tensor(const char* path) {
  FILE* file = fopen(path, "rb");
  if (file == NULL) {
    fprintf(stderr, "cannot open input file %s: %s\n", path, strerror(errno));
    return NULL;
  }
  TF_Tensor* tensor = NULL;
  int32_t rank = 0;
  int64_t dims[MAX_RANK];
  if (read_exactly(file, &rank, sizeof(rank)) != 0 || rank < 0 || rank > MAX_RANK) {
    fprintf(stderr, "input file %s: bad or missing rank\n", path);
    goto done;
  }
  int64_t num_elements = 1;
  for (int32_t i = 0; i < rank; ++i) {
    if (read_exactly(file, &dims[i], sizeof(dims[i])) != 0 || dims[i] < 0) {
      fprintf(stderr, "input file %s: bad or missing dim %d\n", path, (int)i);
      goto done;
    }
    num_elements *= dims[i];
  }
  const size_t num_bytes = (size_t)num_elements * sizeof(float);
  tensor = TF_AllocateTensor(TF_FLOAT, dims, (int)rank, num_bytes);
  if (tensor == NULL) {
    fprintf(stderr, "TF_AllocateTensor failed for %lld floats\n", (long long)num_elements);
    goto done;
  }
  char trailing;
  if (read_exactly(file, TF_TensorData(tensor), num_bytes) != 0 || fread(&trailing, 1, 1, file) != 0) {
    fprintf(stderr, "input file %s: expected exactly %lld float32 values after the header\n", path,
            (long long)num_elements);
    TF_DeleteTensor(tensor);
    tensor = NULL;
  }
done:
  fclose(file);
  return tensor;
}

/* Resolves "op_name[:index]" in `graph`; returns 0 on success, else prints why and returns -1. */
static int find_output(TF_Graph* graph, const char* tensor_name, TF_Output* result) {
  const char* colon = strrchr(tensor_name, ':');
  size_t name_length = colon == NULL ? strlen(tensor_name) : (size_t)(colon - tensor_name);
  long index = 0;
  if (colon != NULL) {
    char* end = NULL;
    index = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0' || index < 0) {
      fprintf(stderr, "bad tensor name %s: expected op_name:index\n", tensor_name);
      return -1;
    }
  }
  char* op_name = malloc(name_length + 1);
  if (op_name == NULL) {
    fprintf(stderr, "out of memory\n");
    return -1;
  }
  memcpy(op_name, tensor_name, name_length);
  op_name[name_length] = '\0';
  TF_Operation* operation = TF_GraphOperationByName(graph, op_name);
  free(op_name);
  if (operation == NULL) {
    fprintf(stderr, "no operation named %.*s in the loaded graph (tensor %s)\n", (int)name_length, tensor_name,
            tensor_name);
    return -1;
  }
  if (index >= TF_OperationNumOutputs(operation)) {
    fprintf(stderr, "operation %.*s has %d outputs; tensor %s is out of range\n", (int)name_length, tensor_name,
            TF_OperationNumOutputs(operation), tensor_name);
    return -1;
  }
  result->oper = operation;
  result->index = (int)index;
  return 0;
}

/* Prints the shape line and then one value per line. */
static void print_tensor(const TF_Tensor* tensor) {
  const int rank = TF_NumDims(tensor);
  for (int i = 0; i < rank; ++i) {
    printf(i == 0 ? "%lld" : " %lld", (long long)TF_Dim(tensor, i));
  }
  printf("\n");
  const float* values = (const float*)TF_TensorData(tensor);
  const int64_t count = TF_TensorElementCount(tensor);
  for (int64_t i = 0; i < count; ++i) {
    printf("%.9g\n", (double)values[i]);
  }
}

static int failed(TF_Status* status, const char* what) {
  if (TF_GetCode(status) == TF_OK) return 0;
  fprintf(stderr, "%s failed (TF_Code %d): %s\n", what, (int)TF_GetCode(status), TF_Message(status));
  return 1;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s EXPORT_DIR INPUT_TENSOR OUTPUT_TENSOR INPUT_FILE\n", argv[0]);
    return 1;
  }
  const char* export_dir = argv[1];
  const char* input_name = argv[2];
  const char* output_name = argv[3];
  const char* input_path = argv[4];

  int exit_code = 1;
  TF_Status* status = TF_NewStatus();
  TF_Graph* graph = TF_NewGraph();
  TF_SessionOptions* options = TF_NewSessionOptions();
  TF_Buffer* meta_graph_def = TF_NewBuffer();
  TF_Session* session = NULL;
  TF_Tensor* input_tensor = NULL;
  TF_Tensor* output_tensor = NULL;

  const char* tags[] = {"serve"};
  session = TF_LoadSessionFromSavedModel(options, NULL, export_dir, tags, 1, graph, meta_graph_def, status);
  if (failed(status, "TF_LoadSessionFromSavedModel")) goto cleanup;

  TF_Output input, output;
  if (find_output(graph, input_name, &input) != 0 || find_output(graph, output_name, &output) != 0) goto cleanup;
  if (TF_OperationOutputType(input) != TF_FLOAT) {
    fprintf(stderr, "input tensor %s is not float32 (TF_DataType %d)\n", input_name,
            (int)TF_OperationOutputType(input));
    goto cleanup;
  }

  input_tensor = read_input_tensor(input_path);
  if (input_tensor == NULL) goto cleanup;

  TF_SessionRun(session, NULL, &input, &input_tensor, 1, &output, &output_tensor, 1, NULL, 0, NULL, status);
  if (failed(status, "TF_SessionRun")) goto cleanup;
  if (output_tensor == NULL || TF_TensorType(output_tensor) != TF_FLOAT) {
    fprintf(stderr, "output tensor %s is not float32 (TF_DataType %d)\n", output_name,
            output_tensor == NULL ? -1 : (int)TF_TensorType(output_tensor));
    goto cleanup;
  }
  print_tensor(output_tensor);
  if (fflush(stdout) != 0 || ferror(stdout)) {
    fprintf(stderr, "writing to stdout failed\n");
    goto cleanup;
  }
  exit_code = 0;

cleanup:
  if (output_tensor != NULL) TF_DeleteTensor(output_tensor);
  if (input_tensor != NULL) TF_DeleteTensor(input_tensor);
  if (session != NULL) {
    TF_CloseSession(session, status);
    if (failed(status, "TF_CloseSession")) exit_code = 1;
    TF_DeleteSession(session, status);
    if (failed(status, "TF_DeleteSession")) exit_code = 1;
  }
  TF_DeleteBuffer(meta_graph_def);
  TF_DeleteSessionOptions(options);
  TF_DeleteGraph(graph);
  TF_DeleteStatus(status);
  return exit_code;
}
